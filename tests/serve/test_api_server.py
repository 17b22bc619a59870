"""`exgra-med serve-api` in a subprocess on 127.0.0.1 (ephemeral port), driven with the `openai` client:
non-streaming and streaming answers, 8 concurrent requests, and 4xx answers to bad input while staying up."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from PIL import Image

from exgra_med.serve.engine import GenerationSettings, InferenceEngine

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
    cmd = [sys.executable, "-m", "exgra_med.cli", "serve-api", "--model", str(tiny_model_dir), "--port", "0",
           "--max-new-tokens", str(MAX_TOKENS), "--max-image-bytes", str(MAX_IMAGE_BYTES)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url, lines = None, []
    deadline = time.time() + 180
    while time.time() < deadline and url is None:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("serving model"):
            url = line.split(" on ", 1)[1].strip()
    if url is None:
        proc.kill()
        pytest.fail("server did not start:\n" + "".join(lines[-30:]))
    assert url.startswith("http://127.0.0.1:")
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    yield client, tiny_model_dir.name
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    """What the same model answers in-process (greedy), for the red test image."""
    engine = InferenceEngine.from_path(str(tiny_model_dir), device="cpu")
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
