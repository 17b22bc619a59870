"""`exgra-med serve-api` in a subprocess on 127.0.0.1 (ephemeral port), driven with the `openai` client:
non-streaming and streaming answers, 8 concurrent requests, and 4xx answers to bad input while staying up: bodies too
large refused before they are read, too many messages and non-finite or out-of-range numbers before any work."""

from __future__ import annotations

import base64
import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from PIL import Image

from exgra_med.model.auto import LoadOptions
from exgra_med.serve.engine import GenerationSettings, InferenceEngine
from tests.conftest import start_api_server

MAX_TOKENS = 6
MAX_IMAGE_BYTES = 60_000
ASSETS = Path(__file__).resolve().parents[2] / "assets"
QUESTION = "What color is the shape?"


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _messages(url: str, question: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": question},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """The real CLI in a subprocess; yields (openai client, model id)."""
    proc, url = start_api_server(tiny_model_dir, "--max-new-tokens", str(MAX_TOKENS), "--max-image-bytes",
                                 str(MAX_IMAGE_BYTES), drain=True)
    assert url.startswith("http://127.0.0.1:")
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    yield client, tiny_model_dir.name
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    """What the same model answers in-process (greedy), for the red test image."""
    engine = InferenceEngine.from_path(str(tiny_model_dir), LoadOptions(device="cpu"))
    image = Image.new("RGB", (40, 30), (220, 30, 30))
    return engine.answer([("human", QUESTION)], image, GenerationSettings(max_new_tokens=MAX_TOKENS)), _png(image)


def test_models_and_non_streaming_answer(server, expected):
    client, model = server
    answer, png = expected
    assert [m.id for m in client.models.list().data] == [model]
    reply = client.chat.completions.create(model=model, messages=_messages(_data_url(png)), max_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == answer and answer
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == MAX_TOKENS and reply.usage.prompt_tokens > 16


def test_streaming_answer_equals_non_streaming(server, expected):
    client, model = server
    answer, png = expected
    stream = client.chat.completions.create(model=model, messages=_messages(_data_url(png)), stream=True)
    deltas = [c.choices[0].delta.content for c in stream]
    text = [d for d in deltas if d]
    assert "".join(text) == answer and len(text) >= 2


def test_eight_concurrent_requests_all_answered(server, expected):
    client, model = server
    answer, png = expected

    def ask(i: int) -> str:
        stream = i % 2 == 1
        out = client.chat.completions.create(model=model, messages=_messages(_data_url(png)), stream=stream)
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in out)
        return out.choices[0].message.content

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert answers == [answer] * 8


def test_dicom_upload_and_multi_turn(server):
    client, model = server
    dicom = (ASSETS / "ct_slice.dcm").read_bytes()
    messages = _messages(_data_url(dicom, "application/dicom"), "What kind of scan is this?")
    first = client.chat.completions.create(model=model, messages=messages).choices[0].message.content
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "Is it normal?"}]
    second = client.chat.completions.create(model=model, messages=messages)
    assert second.usage.prompt_tokens > 16 and second.choices[0].finish_reason in ("stop", "length")


def test_bad_inputs_get_4xx_and_the_server_stays_up(server, expected):
    client, model = server
    answer, png = expected
    noise = Image.fromarray((torch.rand(200, 200, 3, generator=torch.Generator().manual_seed(0)) * 255)
                            .to(torch.uint8).numpy())
    cases = [
        (_messages("data:image/png;base64,@@not-base64@@"), model, 400, "malformed base64"),
        (_messages(_data_url(b"these bytes are not an image")), model, 400, "could not be decoded"),
        (_messages(_data_url(_png(noise))), model, 413, "image too large"),
        (_messages("https://example.org/x.png"), model, 400, "remote URLs are not fetched"),
        (_messages(_data_url(png)), "no-such-model", 404, "not found"),
        ([{"role": "assistant", "content": "hi"}], model, 400, "last message must come from the user"),
    ]
    assert len(_png(noise)) > MAX_IMAGE_BYTES
    for messages, model_id, status, text in cases:
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model=model_id, messages=messages)
        assert err.value.status_code == status, (text, err.value)
        assert text in err.value.message
    with pytest.raises(openai.APIStatusError) as err:  # not even JSON
        client.post("/chat/completions", body=None, cast_to=object, options={"headers": {"content-type": "text/plain"}})
    assert 400 <= err.value.status_code < 500
    reply = client.chat.completions.create(model=model, messages=_messages(_data_url(png)))
    assert reply.choices[0].message.content == answer


def test_max_tokens_is_capped_by_the_server_flag():
    from exgra_med.serve.api import _settings

    default = GenerationSettings(max_new_tokens=60)
    assert _settings({"max_tokens": 1500}, default, 60).max_new_tokens == 60
    assert _settings({"max_tokens": 7}, default, 60).max_new_tokens == 7
    assert _settings({}, default, 60).max_new_tokens == 60


def test_min_tokens_holds_back_the_end_of_sequence_per_row(tiny_model_dir):
    """`min_new_tokens` keeps a row from ending before its minimum, also beside a row without one in the same batch."""
    engine = InferenceEngine.from_path(str(tiny_model_dir), LoadOptions(device="cpu"), max_batch_size=2)
    try:
        question = [("human", "Describe the image.")]
        free = engine.submit(question, None, GenerationSettings(max_new_tokens=200))
        held = engine.submit(question, None, GenerationSettings(max_new_tokens=200, min_new_tokens=120))
        free_text, held_text = "".join(free.pieces()), "".join(held.pieces())
    finally:
        engine.close()
    assert free.finish_reason == "stop" and len(free.generated) < 120  # the model's own answer is short
    assert len(held.generated) >= 120 and held_text.startswith(free_text)
    with pytest.raises(ValueError, match="min_new_tokens"):
        GenerationSettings(max_new_tokens=5, min_new_tokens=6)


@pytest.mark.slow
def test_bounds_queue_disconnect_and_sigterm(tiny_model_dir):
    """A prompt beyond the context is refused (400) while a normal request is answered; a full queue answers 429;
    a client that disconnects cancels its generation; SIGTERM stops the server while it generates."""
    import signal
    import threading

    import httpx

    # `min_tokens` keeps a row busy for the whole answer whatever the tiny model says (about 1 s on this CPU, while
    # the requests below take milliseconds); greedy, so the answer is the same each time.
    long_tokens = 1500
    proc, url = start_api_server(tiny_model_dir, "--max-new-tokens", str(long_tokens), "--max-batch-size", "1",
                       "--max-queue", "1")
    body = {"messages": [{"role": "user", "content": "Describe the image."}], "max_tokens": long_tokens,
            "min_tokens": long_tokens, "stream": True}
    short = {**body, "stream": False, "max_tokens": 3, "min_tokens": 0}
    try:
        with httpx.Client(base_url=url, timeout=120) as http:
            # 1. Oversized prompt: 400 naming the limit, while a normal request is being answered.
            with http.stream("POST", "/chat/completions", json=body) as running:
                lines = running.iter_lines()
                assert next(lines).startswith("data: ")  # generation started
                huge = {"messages": [{"role": "user", "content": "word " * 200000}]}
                refused = http.post("/chat/completions", json=huge)
                assert refused.status_code == 400 and "too long" in refused.json()["error"]["message"]
                text = "".join(line for line in lines if line)  # the running request completes normally
                assert "[DONE]" in text and '"finish_reason": "length"' in text
            # 2. Batch size 1, queue 1, one row busy: of three concurrent requests one waits, two get 429.
            # (Should the busy row end before all three arrive, which takes ~1000x longer than they need, try again.)
            for _attempt in range(3):
                with http.stream("POST", "/chat/completions", json=body) as running:
                    lines = running.iter_lines()
                    assert next(lines).startswith("data: ")
                    answers: list[httpx.Response] = []

                    def post_short(answers=answers):
                        answers.append(httpx.post(f"{url}/chat/completions", json=short, timeout=120))

                    posts = [threading.Thread(target=post_short) for _ in range(3)]
                    for post in posts:
                        post.start()
                    for post in posts:
                        post.join(timeout=120)
                    text = "".join(line for line in lines if line)
                    assert "[DONE]" in text
                if sorted(a.status_code for a in answers) == [200, 429, 429]:
                    break
            assert sorted(a.status_code for a in answers) == [200, 429, 429]
            assert all("retry later" in a.json()["error"]["message"] for a in answers if a.status_code == 429)
            # 3. A client that disconnects mid-answer cancels its generation.
            with http.stream("POST", "/chat/completions", json=body) as dropped:
                next(dropped.iter_lines())
            ok = http.post("/chat/completions", json={**short, "max_tokens": 2})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2
            # 4. SIGTERM while a long answer is being generated: the server stops.
            with http.stream("POST", "/chat/completions", json=body) as last:
                next(last.iter_lines())
                proc.send_signal(signal.SIGTERM)
                # uvicorn shuts down gracefully, then re-raises the signal: the status says "ended by SIGTERM".
                assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read()
    assert "client went away; generation cancelled" in output, output[-3000:]


def _raw_post(url: str, head: dict[str, str], chunks, path: str = "/v1/chat/completions") -> str:
    """POST `chunks` (bytes, sent one by one) over a plain socket and return the response, read as soon as the server
    answers: the request may still be incomplete (the server may stop reading it)."""
    import socket
    from urllib.parse import urlsplit

    host, port = urlsplit(url).hostname, urlsplit(url).port
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
             *(f"{k}: {v}" for k, v in head.items())]
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except OSError:  # the server answered and closed while we were still sending
            pass
        response = b""
        while b"\r\n\r\n" not in response and (data := sock.recv(65536)):
            response += data
        head_end = response.find(b"\r\n\r\n") + 4
        length = re.search(rb"(?i)content-length: *(\d+)", response[:head_end])
        while length and len(response) < head_end + int(length[1]) and (data := sock.recv(65536)):
            response += data
    return response.decode("utf-8", "replace")


def test_an_oversized_body_is_refused_before_it_is_read(server):
    """413 from the declared Content-Length, or once a chunked body passes the limit: the server answers while the
    body is still being sent (here: never finished), so an oversized request costs no parsing."""
    client, _ = server
    url = str(client.base_url)
    limit = MAX_IMAGE_BYTES * 4 // 3 + 1024 * 1024  # the default: a base64 image of --max-image-bytes, and 1 MiB
    part = b"[" + b'{"role": "user", "content": ""}, ' * 2000  # the start of 400k empty messages (13 MB)
    declared = _raw_post(url, {"Content-Length": str(13_200_014)}, [part])
    assert declared.startswith("HTTP/1.1 413"), declared[:300]
    assert f"request body too large: more than {limit} bytes (limit --max-request-bytes)" in declared

    def chunked(total: int):
        piece = b'{"role": "user", "content": ""}, ' * 1000
        for _ in range(total // len(piece) + 1):
            yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"  # never the last (empty) chunk

    streamed = _raw_post(url, {"Transfer-Encoding": "chunked"}, chunked(limit + 200_000))
    assert streamed.startswith("HTTP/1.1 413"), streamed[:300]
    assert "request body too large" in streamed
    assert client.models.list().data  # still serving


def test_numbers_and_message_counts_are_bounded_before_any_work(server):
    """Non-finite or out-of-range numbers and too many messages get a 400 naming the parameter. Each request also
    holds an image that cannot be decoded: the answer is about the parameter, so the image was never decoded."""
    import httpx

    client, model = server
    bad_image = json.dumps(_messages(_data_url(b"not an image")))
    cases = [
        (f'{{"messages": {bad_image}, "max_tokens": 1e999}}', "max_tokens must be a finite number"),
        (f'{{"messages": {bad_image}, "max_completion_tokens": -Infinity}}',
         "max_completion_tokens must be a finite number"),
        (f'{{"messages": {bad_image}, "temperature": NaN}}', "temperature must be a finite number"),
        (f'{{"messages": {bad_image}, "top_p": NaN}}', "top_p must be a finite number"),
        (f'{{"messages": {bad_image}, "max_tokens": 0}}', "max_tokens must be an integer >= 1, got 0"),
        (f'{{"messages": {bad_image}, "max_tokens": 2.5}}', "max_tokens must be an integer >= 1, got 2.5"),
        (f'{{"messages": {bad_image}, "min_tokens": -1}}', "min_tokens must be an integer >= 0, got -1"),
        (f'{{"messages": {bad_image}, "temperature": "hot"}}', "temperature must be a finite number"),
        (json.dumps({"messages": [{"role": "user", "content": ""}] * 600}),
         "at most 512 messages are accepted, got 600 (limit --max-messages)"),
        ("[1, 2]", "the request body must be a JSON object"),
        ('{"messages": [', "the request body is not valid JSON"),
    ]
    with httpx.Client(base_url=str(client.base_url), timeout=30) as http:
        for body, message in cases:
            reply = http.post("/chat/completions", content=body, headers={"content-type": "application/json"})
            assert reply.status_code == 400, (body[:80], reply.text[:300])
            assert message in reply.json()["error"]["message"], (message, reply.text[:300])
        good = http.post("/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                    "max_tokens": 2, "temperature": 0})
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] <= 2
