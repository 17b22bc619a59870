"""`exgra-med serve-api --model OWNER/NAME`: the server loads a Hub id from a local cache, offline, and answers as the
same model loaded from its folder."""

from __future__ import annotations

import base64
import io

import openai
import pytest
from PIL import Image

from exgra_med.model.auto import LoadOptions
from exgra_med.serve.engine import GenerationSettings, InferenceEngine
from tests.conftest import start_api_server

QUESTION = "What color is the shape?"


@pytest.mark.slow
def test_serve_api_from_a_hub_id(offline_hub, tiny_model_dir):
    image = Image.new("RGB", (40, 30), (220, 30, 30))
    expected = InferenceEngine.from_path(str(tiny_model_dir), LoadOptions(device="cpu")).answer(
        [("human", QUESTION)], image, GenerationSettings(max_new_tokens=6))
    proc, url = start_api_server("acme/tiny-exgra", "--max-new-tokens", "6", "--device", "cpu",
                                 env={"HF_HUB_CACHE": str(offline_hub)}, drain=True)
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["acme/tiny-exgra"]
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        url_image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        reply = client.chat.completions.create(model="acme/tiny-exgra", max_tokens=6, messages=[
            {"role": "user", "content": [{"type": "text", "text": QUESTION},
                                         {"type": "image_url", "image_url": {"url": url_image}}]}])
        assert reply.choices[0].message.content == expected
    finally:
        proc.terminate()
        proc.wait(timeout=30)
