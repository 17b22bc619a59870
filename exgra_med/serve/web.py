"""`exgra-med web --model DIR`: a Gradio demo. Upload an image (PNG/JPEG/DICOM), ask, read the streamed answer.

The server binds 127.0.0.1 unless `--host` says otherwise and serves no file beyond its own uploads and
the example images (Gradio's `allowed_paths` names only the examples folder). It has the API's limits: uploads of at
most `--max-image-bytes` bytes and `--max-image-pixels` pixels (read from the header before decoding), decoded within
`--max-image-memory-mb` (`image_memory`: a busy message when there is no room within seconds), conversations
(history included) within the model's context and `--max-prompt-tokens`, `--max-batch-size` users decoded together
and `--max-queue` waiting. As the API, it fetches nothing: a file named by URL is refused (Gradio would download it).
Uploads live in a private folder (mode 0700), deleted when the server stops (also on SIGTERM) or, after a kill, when
the next server starts; responses and messages show the folder under an alias, never a server path.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import secrets
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path

from exgra_med.constants import RESEARCH_USE_NOTICE
from exgra_med.conversation import GPT, HUMAN
from exgra_med.data.images import ImageLoadError
from exgra_med.errors import HelpFormatter
from exgra_med.model.options import DecodingOptions, ModelOptions
from exgra_med.serve.batching import QueueFullError, ServerClosingError
from exgra_med.serve.engine import GenerationSettings, InferenceEngine, Message, PromptTooLongError
from exgra_med.serve.image_memory import (
    ImageDecoder,
    server_decoder,
)
from exgra_med.serve.loading import load_engine_or_exit_code
from exgra_med.serve.options import DEFAULT_MAX_IMAGE_MEMORY_MB, SERVE_MAX_NEW_TOKENS, add_serving_limits
from exgra_med.serve.uploads import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    FolderAlias,
    PrivateFolder,
    UploadError,
    refuse_remote_files,
    remove_leftovers,
)

logger = logging.getLogger(__name__)

IMAGE_TYPES = [".png", ".jpg", ".jpeg", ".dcm", ".dicom"]
PREVIEW_SIDE = 256  # the preview (240 pixels high) is decoded reduced to at least 3 x this on its shorter side
EXAMPLE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm"}
# Questions paired with the example images, by file stem (other examples get the default question).
EXAMPLE_QUESTIONS = {
    "red_circle": "What shape is in the image?",
    "blue_rectangle": "What color is the shape?",
    "green_triangle": "Is there a triangle in the image?",
    "ct_slice": "What kind of scan is this?",
}
DEFAULT_QUESTION = "Describe the image concisely."


def default_examples_dir() -> Path:
    """The repository's `assets/` folder (present in a source checkout)."""
    return Path(__file__).resolve().parents[2] / "assets"


def find_examples(folder: Path | None) -> list[list[str]]:
    """[image path, question] pairs for every example image in `folder`, sorted by name."""
    if folder is None or not folder.is_dir():
        return []
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in EXAMPLE_SUFFIXES and p.stem != "web_demo")
    return [[str(p), EXAMPLE_QUESTIONS.get(p.stem, DEFAULT_QUESTION)] for p in files]


def _text(content: object) -> str:
    """The text of a Gradio message content: a string, or (Gradio 6) a list of {"type": "text", "text": ...}."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text")
    return ""


def history_to_messages(history: list[dict]) -> list[Message]:
    """Gradio chat history (role/content dicts) -> engine messages."""
    roles = {"user": HUMAN, "assistant": GPT}
    return [(roles[m["role"]], _text(m.get("content"))) for m in history if m.get("role") in roles]


def _without_paths(message: str, path: str | None) -> str:
    """`message` with the server-side location of an upload replaced by its file name."""
    if path:
        message = message.replace(str(path), Path(path).name).replace(str(Path(path).parent), "<upload>")
    return message


@contextlib.contextmanager
def open_upload(path: str, decoder: ImageDecoder, max_bytes: int = DEFAULT_MAX_BYTES,
                side: int | None = None) -> Iterator:
    """An uploaded file as an RGB image, after the API's checks (bytes, then the header's pixel count), decoded by
    the API's `decoder` (its image memory budget held for the `with` block; reduced for the model, or for `side`);
    failures raise ImageLoadError with a message that names no server path."""
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise ImageLoadError(f"image too large: {size} bytes > {max_bytes} (limit --max-image-bytes)")
        with decoder.open(path, side) as image:
            yield image
    except (ImageLoadError, UploadError, OSError) as e:
        raise ImageLoadError(_without_paths(str(e), path)) from None


@functools.cache
def _uploads_only_blocks() -> type:
    """`gr.Blocks` whose events refuse a file named by URL before Gradio downloads it (it would, for an http(s) path:
    `processing_utils.async_move_files_to_cache` moves every input file to the cache before `preprocess`)."""
    import gradio as gr  # lazy: the `serve` extra

    class UploadsOnlyBlocks(gr.Blocks):
        async def preprocess_data(self, block_fn, inputs, state, explicit_call=False):
            try:
                refuse_remote_files(inputs)
            except UploadError as e:
                raise gr.Error(str(e)) from None
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)

    return UploadsOnlyBlocks


def build_demo(engine: InferenceEngine, settings: GenerationSettings | None = None,
               examples_dir: Path | None = None, max_image_bytes: int = DEFAULT_MAX_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS, max_image_memory_mb: int = DEFAULT_MAX_IMAGE_MEMORY_MB):
    """The Gradio Blocks app around `engine`, with the upload limits of the API (images decoded within
    `max_image_memory_mb`, `demo.image_decoder`)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr  # lazy: the `serve` extra

    settings = settings or GenerationSettings()
    decoder = server_decoder(engine, max_pixels, max_image_memory_mb, engine.scheduler.max_queue)

    def preview(path: str | None):
        if not path:
            return None, []
        try:
            with open_upload(path, decoder, max_image_bytes, PREVIEW_SIDE) as image:
                return image, []
        except ImageLoadError as e:
            gr.Warning(f"Cannot read this image: {e}")
            return None, []

    def respond(question: str, path: str | None, history: list[dict]) -> Iterator[tuple[str, list[dict]]]:
        question = (question or "").strip()
        if not question:
            yield "", history
            return
        history = list(history or [])
        messages = history_to_messages(history) + [(HUMAN, question)]
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        yield "", history
        try:
            if path:  # the image memory budget is held until the image is encoded for the model
                with open_upload(path, decoder, max_image_bytes) as image:
                    job = engine.submit(messages, image, settings)
            else:
                job = engine.submit(messages, None, settings)
            answer = ""
            try:
                for piece in job.pieces():
                    answer += piece
                    history[-1] = {"role": "assistant", "content": answer}
                    yield "", history
            finally:
                job.cancel()  # no-op when complete; stops the row when the user went away
        except ImageLoadError as e:
            history[-1] = {"role": "assistant", "content": f"(cannot read the image: {e})"}
            yield "", history
        except PromptTooLongError as e:
            history[-1] = {"role": "assistant", "content": f"({e}; press 'Clear history')"}
            yield "", history
        except (QueueFullError, ServerClosingError) as e:
            history[-1] = {"role": "assistant", "content": f"({e})"}
            yield "", history

    with _uploads_only_blocks()(title="ExGra-Med demo") as demo:
        gr.Markdown("# ExGra-Med: medical visual question answering")
        gr.Markdown(f"**{RESEARCH_USE_NOTICE}**", elem_id="notice")
        with gr.Row():
            with gr.Column(scale=1):
                image_file = gr.File(label="Image (PNG, JPEG or DICOM)", file_types=IMAGE_TYPES,
                                     type="filepath", elem_id="image-upload")
                image_view = gr.Image(label="Preview", interactive=False, elem_id="image-preview", height=240)
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=360)
                question = gr.Textbox(label="Question", placeholder="Ask about the image", elem_id="question")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear = gr.Button("Clear history", elem_id="clear")
        examples = find_examples(examples_dir)
        if examples:
            gr.Examples(examples=examples, inputs=[image_file, question], label="Examples")
        image_file.change(preview, inputs=image_file, outputs=[image_view, chatbot])
        send.click(respond, inputs=[question, image_file, chatbot], outputs=[question, chatbot])
        question.submit(respond, inputs=[question, image_file, chatbot], outputs=[question, chatbot])
        clear.click(list, outputs=chatbot)
    demo.image_decoder = decoder
    return demo


def launch_demo(engine: InferenceEngine, host: str = "127.0.0.1", port: int = 7860,
                settings: GenerationSettings | None = None, examples_dir: Path | None = None,
                max_image_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_image_memory_mb: int = DEFAULT_MAX_IMAGE_MEMORY_MB):
    """Build and start the demo in a background thread; returns (demo, local URL). `demo.close()` stops it and
    deletes its uploads (they go to a `PrivateFolder`, `demo.upload_dir`, shown to clients under an alias)."""
    from starlette.middleware import Middleware  # lazy: installed with gradio, the `serve` extra

    examples_dir = examples_dir if examples_dir is not None else default_examples_dir()
    folder = PrivateFolder("web")
    os.environ["GRADIO_TEMP_DIR"] = str(folder.path)  # read by Gradio when the app and its components are built
    demo = build_demo(engine, settings, examples_dir, max_image_bytes, max_pixels, max_image_memory_mb)
    demo.upload_dir = folder.path
    close = demo.close

    def close_and_clean(verbose: bool = True) -> None:
        close(verbose)
        folder.remove()

    demo.close = close_and_clean
    allowed = [str(examples_dir)] if examples_dir.is_dir() else []
    alias = Middleware(FolderAlias, folder=folder.path, alias=f"upload-{secrets.token_hex(6)}")
    _, url, _ = demo.queue(default_concurrency_limit=engine.scheduler.max_batch_size).launch(
        server_name=host, server_port=port, share=False, allowed_paths=allowed, ssr_mode=False,
        prevent_thread_lock=True, quiet=True, footer_links=[], max_file_size=max_image_bytes,
        app_kwargs={"middleware": [alias]},
    )
    logger.info("demo serving on %s (uploads in %s)", url, folder.path)
    return demo, url


def build_parser() -> argparse.ArgumentParser:
    """The flags of `exgra-med web`."""
    p = argparse.ArgumentParser(
        prog="exgra-med web", description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
    )
    ModelOptions.add_arguments(p)
    DecodingOptions.add_arguments(p, max_new_tokens=SERVE_MAX_NEW_TOKENS)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--examples-dir", default=None, help="folder of example images (default: the repo's assets/)")
    p.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_BYTES, help="largest accepted image upload")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="largest accepted canvas")
    add_serving_limits(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: load the model and serve the demo until interrupted."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    remove_leftovers()  # the uploads of a server that was killed go now, not after the model loads
    loaded = load_engine_or_exit_code(args, "exgra-med web")
    if isinstance(loaded, int):
        return loaded
    engine, settings = loaded
    examples = Path(args.examples_dir) if args.examples_dir else None

    def stop(signum, frame):
        raise KeyboardInterrupt  # block_thread closes the server; the finally below cleans up

    signal.signal(signal.SIGTERM, stop)
    demo = None
    try:
        demo, url = launch_demo(engine, args.host, args.port, settings, examples, args.max_image_bytes,
                                args.max_image_pixels, args.max_image_memory_mb)
        print(f"ExGra-Med demo on {url} (Ctrl-C to stop)", flush=True)
        demo.block_thread()
    finally:
        engine.close(wait=False)
        if demo is not None:
            demo.close(verbose=False)
    return 0
