"""The shared inference helper: prompts, streamed answers equal to non-streamed ones, the stop-text filter,
serialised concurrent use and the CPU message for quantised loading."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from exgra_med.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN
from exgra_med.conversation import get_template
from exgra_med.data.images import load_image
from exgra_med.serve.engine import GenerationInfo, GenerationSettings, InferenceEngine
from exgra_med.serve.loading import QuantizationUnavailableError, load_model
from exgra_med.serve.streaming import AnswerFilter

SETTINGS = GenerationSettings(max_new_tokens=6)
ASSETS = Path(__file__).resolve().parents[2] / "assets"


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return InferenceEngine.from_path(str(tiny_model_dir), device="cpu")


def _image() -> Image.Image:
    return Image.new("RGB", (48, 32), (200, 20, 20))


@pytest.mark.parametrize("name", ["llava_med", "simple"])
@pytest.mark.parametrize("raw", [
    " A red circle.\n### Human: more",
    "Assistant: yes ###",
    "  Assistant:no",
    "Assist the doctor #1 #",
    "  partial answer ##",
    "",
])
def test_filter_equals_clean_answer_for_any_chunking(name, raw):
    template = get_template(name)
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(raw) + 1), k=min(3, len(raw) + 1)))
        chunks = [raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)])]
        f = AnswerFilter(template)
        shown = "".join(f.push(c) for c in chunks) + f.finish()
        assert shown == template.clean_answer(raw)


def test_filter_never_shows_a_stop_prefix():
    f = AnswerFilter(get_template("llava_med"))
    assert f.push(" Yes") == "Yes"
    assert f.push(" #") == ""  # may be the start of "###"
    assert f.push("#") == ""
    assert f.push("#") == ""  # it was: stop
    assert f.stopped and f.push(" more") == "" and f.text == "Yes"


def test_prompt_places_image_tokens_and_history(engine):
    n = engine.model.num_image_tokens
    image = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_PATCH_TOKEN * n + DEFAULT_IM_END_TOKEN
    prompt = engine.build_prompt([("human", "What is it?"), ("gpt", "A circle."), ("human", "Colour?")], True)
    assert prompt.endswith(
        f"### Human: What is it?\n{image}\n### Assistant: A circle.\n### Human: Colour?\n### Assistant:"
    )
    assert engine.build_prompt([("human", "<image>\nWhat is it?")], True).count(image) == 1
    assert DEFAULT_IMAGE_PATCH_TOKEN not in engine.build_prompt([("human", "What is <image>?")], False)
    assert engine.build_prompt([("human", "Hi")], False, system="Be brief.").startswith("Be brief.\n\n### Human: Hi")
    with pytest.raises(ValueError, match="must end with a human message"):
        engine.build_prompt([("human", "Hi"), ("gpt", "Hello")], False)


def test_stream_equals_answer_equals_direct_generation(engine):
    messages = [("human", "What color is the shape?")]
    info = GenerationInfo()
    pieces = list(engine.stream(messages, _image(), SETTINGS, info=info))
    ids = engine.encode(messages, has_image=True)
    raw = engine.model.generate(
        ids, engine.preprocess(_image()), max_new_tokens=6, do_sample=False, pad_token_id=engine.tokenizer.pad_token_id
    )
    expected = engine.template.clean_answer(engine.tokenizer.decode(raw[0], skip_special_tokens=True))
    assert expected and "".join(pieces) == expected
    assert len(pieces) >= 2  # it really streams
    assert engine.answer(messages, _image(), SETTINGS) == expected
    assert info.prompt_tokens == ids.shape[1] and info.completion_tokens == 6 and info.finish_reason == "length"
    # The image matters.
    longer = GenerationSettings(max_new_tokens=12)
    other = engine.answer(messages, Image.new("RGB", (32, 32), (0, 0, 250)), longer)
    assert other != engine.answer(messages, _image(), longer)


def test_image_paths_png_and_dicom(engine):
    messages = [("human", "What kind of scan is this?")]
    for name in ("ct_slice.dcm", "red_circle.png"):
        path = ASSETS / name
        assert engine.answer(messages, path, SETTINGS) == engine.answer(messages, load_image(path), SETTINGS)
    dicom = engine.preprocess(ASSETS / "ct_slice.dcm")
    assert dicom.shape == (1, 3, 32, 32) and dicom.std() > 0.1


def test_concurrent_streams_are_serialised_and_all_answered(engine):
    messages = [("human", "Is there a circle in the image?")]
    expected = engine.answer(messages, _image(), SETTINGS)
    results: list[str] = []
    inside = []
    active = threading.Semaphore(1)

    def worker():
        chunks = []
        for piece in engine.stream(messages, _image(), SETTINGS):
            inside.append(active.acquire(blocking=False))  # only one generation at a time holds the model
            chunks.append(piece)
            active.release()
        results.append("".join(chunks))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [expected] * 4 and all(inside)


def test_quantised_loading_on_cpu_says_why(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(QuantizationUnavailableError, match="--load-4bit needs a CUDA GPU"):
        load_model(str(tiny_model_dir), load_4bit=True)
    with pytest.raises(QuantizationUnavailableError, match="--load-8bit needs a CUDA GPU"):
        load_model(str(tiny_model_dir), load_8bit=True)
    with pytest.raises(ValueError, match="neither an ExGra-Med checkpoint"):
        load_model(str(tiny_model_dir / "vision"))
