"""`exgra-med serve-api --model DIR`: an OpenAI-compatible server (`/v1/chat/completions`, `/v1/models`).

Images travel as `image_url` content parts holding base64 data URLs (at most one per request, as in LLaVA-Med).
Streaming answers are server-sent events in OpenAI's chunk format. Concurrent requests are decoded together in batches
(`--max-batch-size`); more than `--max-queue` waiting requests get a 429, and so do requests whose images find no room
in `--max-image-memory-mb` within seconds (`image_memory`). Prompts (history included) longer than the
model's context or `--max-prompt-tokens` get a 400 before any work; `max_tokens` is capped by `--max-new-tokens`;
`min_tokens` (as in vLLM) holds back the end of sequence for that many tokens. Bodies beyond `--max-request-bytes` get
a 413 before they are read (from Content-Length, or while reading), more than `--max-messages` messages a 400 before
any other work, and so do numbers that are not finite or out of range. A client that disconnects cancels its
generation; SIGTERM stops the server within seconds. Bad input gets a 4xx with an OpenAI-style error body. For serving
at scale, use vLLM or SGLang on the output of `exgra-med export-hf`.
"""

import argparse
import contextlib
import json
import logging
import math
import queue
import socket
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from exgra_med.conversation import GPT, HUMAN
from exgra_med.errors import HelpFormatter, UserError
from exgra_med.model.options import DecodingOptions, ModelOptions
from exgra_med.serve.batching import Job, QueueFullError, ServerClosingError
from exgra_med.serve.engine import GenerationSettings, InferenceEngine, Message, PromptTooLongError
from exgra_med.serve.image_memory import (
    ImageDecoder,
    ImageMemoryBusyError,
    server_decoder,
)
from exgra_med.serve.loading import load_engine_or_exit_code
from exgra_med.serve.options import DEFAULT_MAX_IMAGE_MEMORY_MB, SERVE_MAX_NEW_TOKENS, add_serving_limits
from exgra_med.serve.uploads import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    PrivateFolder,
    UploadError,
    decode_data_url,
    image_from_bytes,
    remove_leftovers,
)

logger = logging.getLogger(__name__)

ROLES = {"user": HUMAN, "assistant": GPT}
DEFAULT_MAX_MESSAGES = 512
TEXT_ALLOWANCE = 1024 * 1024  # request bytes besides the image


def default_max_request_bytes(max_image_bytes: int) -> int:
    """The default body limit: one base64 image of `max_image_bytes`, and 1 MiB of text and JSON."""
    return max_image_bytes * 4 // 3 + TEXT_ALLOWANCE


class RequestError(ValueError):
    """A request the server rejects; `status` is the HTTP status (4xx)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


def _text_and_images(content: Any, where: str) -> tuple[str, list[str]]:
    """Split an OpenAI message content (string or list of parts) into text and image URLs."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise RequestError(f"{where}.content must be a string or a list of content parts", param=where)
    texts, images = [], []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise RequestError(f"{where}.content[{i}].image_url.url must be a string", param=where)
            images.append(url)
        else:
            raise RequestError(f"{where}.content[{i}]: unsupported content part (text or image_url)", param=where)
    return "\n".join(texts), images


def parse_messages(messages: Any, max_messages: int = DEFAULT_MAX_MESSAGES) -> tuple[list[Message], str | None,
                                                                                      list[str]]:
    """OpenAI messages -> (conversation, system prompt or None, image URLs in order)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    if len(messages) > max_messages:
        raise RequestError(f"at most {max_messages} messages are accepted, got {len(messages)} (limit --max-messages)",
                           param="messages")
    conversation: list[Message] = []
    system, images = None, []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or "role" not in message:
            raise RequestError(f"{where} must be an object with a role", param=where)
        text, urls = _text_and_images(message.get("content", ""), where)
        role = message["role"]
        if role in ("system", "developer"):
            system = text if system is None else f"{system}\n{text}"
        elif role in ROLES:
            conversation.append((ROLES[role], text))
            images += urls
        else:
            raise RequestError(f"{where}.role {role!r} is not supported (system, user, assistant)", param=where)
    if not conversation or conversation[-1][0] != HUMAN:
        raise RequestError("the last message must come from the user", param="messages")
    if len(images) > 1:
        raise RequestError(f"at most one image per conversation is supported, got {len(images)}", param="messages")
    return conversation, system, images


def _finite(body: dict, name: str) -> float | None:
    """`body[name]` as a finite number, or None when absent; anything else (NaN, 1e999, a string) is refused."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number, got {value!r}", param=name)
    return value


def _count(body: dict, name: str, minimum: int) -> int | None:
    """`body[name]` as an integer >= `minimum`, or None when absent."""
    value = _finite(body, name)
    if value is not None and (value != int(value) or value < minimum):
        raise RequestError(f"{name} must be an integer >= {minimum}, got {value!r}", param=name)
    return None if value is None else int(value)


def _settings(body: dict, default: GenerationSettings, max_tokens_limit: int) -> GenerationSettings:
    """The request's decoding settings; `max_tokens` defaults to, and is capped by, `max_tokens_limit`;
    `min_tokens` (vLLM's extension) keeps the end-of-sequence token away for that many tokens."""
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    limit = _count(body, name, 1) or max_tokens_limit
    temperature, top_p = _finite(body, "temperature"), _finite(body, "top_p")
    try:
        return GenerationSettings(
            max_new_tokens=min(limit, max_tokens_limit),
            temperature=default.temperature if temperature is None else temperature,
            top_p=default.top_p if top_p is None else top_p,
            min_new_tokens=_count(body, "min_tokens", 0) or 0,
        )
    except ValueError as e:
        raise RequestError(f"invalid sampling parameter: {e}") from e


def create_app(
    engine: InferenceEngine,
    default_settings: GenerationSettings | None = None,
    max_image_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_tokens_limit: int | None = None,
    max_request_bytes: int | None = None,
    max_messages: int = DEFAULT_MAX_MESSAGES,
    upload_folder: PrivateFolder | None = None,
    max_image_memory_mb: int = DEFAULT_MAX_IMAGE_MEMORY_MB,
    image_decoder: ImageDecoder | None = None,
):
    """The FastAPI application serving `engine` under the model id `engine.name`; `max_tokens_limit` (default: the
    default settings' `max_new_tokens`) caps every request's `max_tokens`; `max_request_bytes` (default:
    `default_max_request_bytes`) bounds the body. Images are decoded from a file in `upload_folder` (default: a new
    `PrivateFolder`, `app.state.upload_folder`) by `image_decoder` (default: `server_decoder`, within
    `max_image_memory_mb`; `app.state.image_decoder`)."""
    # lazy: fastapi is the `serve` extra
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, StreamingResponse

    default_settings = default_settings or GenerationSettings()
    max_tokens_limit = max_tokens_limit or default_settings.max_new_tokens
    max_request_bytes = max_request_bytes or default_max_request_bytes(max_image_bytes)
    upload_folder = upload_folder or PrivateFolder("api")
    image_decoder = image_decoder or server_decoder(engine, max_pixels, max_image_memory_mb)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        upload_folder.remove()  # at shutdown: uvicorn then re-raises SIGTERM, and the process ends without `finally`

    app = FastAPI(title="ExGra-Med API", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.upload_folder = upload_folder
    app.state.image_decoder = image_decoder
    created = int(time.time())

    def error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
        kinds = {404: "not_found_error", 429: "rate_limit_error", 503: "server_error"}
        body = {"error": {"message": message, "type": kinds.get(status, "invalid_request_error"), "param": param,
                          "code": status}}
        return JSONResponse(body, status_code=status, headers=headers)

    @app.get("/v1/models")
    def list_models() -> dict:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": created,
                                             "owned_by": "exgra-med"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        try:
            body = await run_in_threadpool(_json_object, await _read_body(request))
            job = await run_in_threadpool(_submit, body)
        except ImageMemoryBusyError as e:
            logger.info("refused request: %s", e)
            return error(429, str(e), headers={"Retry-After": str(e.retry_after)})
        except (RequestError, UploadError) as e:
            logger.info("rejected request: %s", e)
            return error(e.status, str(e), getattr(e, "param", None))
        except PromptTooLongError as e:
            logger.info("rejected request: %s", e)
            return error(400, str(e), "messages")
        except UserError as e:  # an image that passed the upload checks but not the decoder
            return error(400, str(e))
        except QueueFullError as e:
            return error(429, str(e))
        except ServerClosingError as e:
            return error(503, str(e))
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.get("stream"):
            return StreamingResponse(_sse(job, request_id), media_type="text/event-stream")
        pieces = []
        try:
            while (piece := await _next(job, request)) is not None:
                pieces.append(piece)
        except ServerClosingError as e:
            return error(503, str(e))
        finally:
            job.cancel()  # no-op when complete; stops the row when the client went away
        usage = {"prompt_tokens": len(job.input_ids), "completion_tokens": len(job.generated),
                 "total_tokens": len(job.input_ids) + len(job.generated)}
        finish = "length" if job.finish_reason == "length" else "stop"
        return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": engine.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                             "finish_reason": finish}], "usage": usage}

    async def _read_body(request: Request) -> bytes:
        # Counted before it is read (Content-Length) and while it is read (chunked): a huge body is never parsed.
        too_large = RequestError(f"request body too large: more than {max_request_bytes} bytes "
                                 "(limit --max-request-bytes)", status=413)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_request_bytes:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_request_bytes:
                raise too_large
        return bytes(body)

    def _submit(body: dict) -> Job:
        if body.get("model") not in (engine.name, None):
            raise RequestError(f"model {body.get('model')!r} not found; this server serves {engine.name!r}",
                               status=404, param="model")
        if body.get("n", 1) != 1:
            raise RequestError("only n=1 is supported", param="n")
        conversation, system, urls = parse_messages(body.get("messages"), max_messages)
        settings = _settings(body, default_settings, max_tokens_limit)
        # The cheap length check first: a huge prompt is refused before its image is decoded.
        engine.check_prompt_text(conversation, settings, system)
        if not urls:
            return engine.submit(conversation, None, settings, system)
        # Decoded within the image memory budget, which is held until the image is encoded (its processor's arrays).
        with image_from_bytes(decode_data_url(urls[0], max_image_bytes), upload_folder.path, image_decoder) as image:
            return engine.submit(conversation, image, settings, system)

    async def _next(job: Job, request: Request | None = None) -> str | None:
        # Wait for the next piece in short slices, so that a client that went away is noticed (and its row stopped).
        while True:
            try:
                return await run_in_threadpool(job.next_piece, 0.25)
            except queue.Empty:
                if request is not None and await request.is_disconnected():
                    logger.info("client disconnected; generation cancelled")
                    job.cancel()
                    return None

    async def _sse(job: Job, request_id: str) -> AsyncIterator[str]:
        def chunk(delta: dict, finish: str | None = None) -> str:
            body = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": engine.name, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(body)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            try:
                while (piece := await _next(job)) is not None:
                    yield chunk({"content": piece})
            except Exception as e:  # the status line is already sent: report in-band, as OpenAI does
                logger.warning("generation ended with an error: %s", e)
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
                return
            yield chunk({}, "length" if job.finish_reason == "length" else "stop")
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects (the response task is cancelled)
            if not job.done:
                logger.info("client went away; generation cancelled")
            job.cancel()

    return app


def _json_object(body: bytes) -> dict:
    """The request body as a JSON object; anything else is a 400."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise RequestError("the request body must be a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The flags of `exgra-med serve-api`."""
    p = argparse.ArgumentParser(
        prog="exgra-med serve-api", description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
    )
    ModelOptions.add_arguments(p)
    DecodingOptions.add_arguments(p, max_new_tokens=SERVE_MAX_NEW_TOKENS)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="port (0 = any free port)")
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: folder name)")
    p.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_BYTES, help="largest accepted image upload")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="largest accepted canvas")
    p.add_argument("--max-request-bytes", type=int, default=None,
                   help="largest request body in bytes; when unset, a base64 image of --max-image-bytes and 1 MiB")
    p.add_argument("--max-messages", type=int, default=DEFAULT_MAX_MESSAGES, help="most messages in a request")
    add_serving_limits(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: load the model and serve it until interrupted (binds 127.0.0.1 unless told otherwise)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, value in (("--max-request-bytes", args.max_request_bytes), ("--max-messages", args.max_messages),
                        ("--max-image-memory-mb", args.max_image_memory_mb)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:  # bound before the model loads: a port in use is reported at once
        sock = socket.create_server((args.host, args.port))
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from e
    remove_leftovers()  # the uploads of a server that was killed go now, not after the model loads
    loaded = load_engine_or_exit_code(args, "exgra-med serve-api")
    if isinstance(loaded, int):
        sock.close()
        return loaded
    engine, settings = loaded
    if args.served_model_name:
        engine.name = args.served_model_name
    import uvicorn  # lazy: the `serve` extra

    app = create_app(engine, settings, args.max_image_bytes, args.max_image_pixels, settings.max_new_tokens,
                     args.max_request_bytes, args.max_messages,
                     image_decoder=server_decoder(engine, args.max_image_pixels, args.max_image_memory_mb,
                                                  max_waiting=args.max_queue))
    host, port = sock.getsockname()[:2]
    print(f"serving model {engine.name!r} on http://{host}:{port}/v1", flush=True)
    class Server(uvicorn.Server):
        """Also cancels the engine's running and queued generations on SIGTERM / Ctrl-C, so that open requests end
        and the process stops within seconds."""

        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            engine.close(wait=False)

    server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
        app.state.upload_folder.remove()
    return 0
