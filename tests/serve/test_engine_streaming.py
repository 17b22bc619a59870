"""The shared inference helper: prompts, streamed answers equal to non-streamed ones, the stop-text filter,
serialised concurrent use and the CPU message for quantised loading."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from exgra_med.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN
from exgra_med.conversation import get_template
from exgra_med.data.images import load_image
from exgra_med.model.auto import LoadOptions, load_backend
from exgra_med.model.quantization import QuantizationUnavailableError
from exgra_med.serve.batching import QueueFullError, ServerClosingError
from exgra_med.serve.engine import GenerationInfo, GenerationSettings, InferenceEngine, PromptTooLongError
from exgra_med.serve.streaming import AnswerFilter

SETTINGS = GenerationSettings(max_new_tokens=6)
ASSETS = Path(__file__).resolve().parents[2] / "assets"


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return InferenceEngine.from_path(str(tiny_model_dir), LoadOptions(device="cpu"))


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


def test_an_unarmed_filter_passes_stop_strings_until_armed():
    f = AnswerFilter(get_template("llava_med"), armed=False)  # a request's min_tokens not reached yet
    assert f.push(" Yes ###") == "Yes ###"
    f.arm()
    assert f.push(" and more #") == " and more"  # from here "#" may start the stop string again
    assert f.push("## Human:") == "" and f.stopped and f.text == "Yes ### and more"


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
    ids = torch.tensor([engine.backend.encode_conversation(messages, _image()).input_ids])
    raw = engine.model.generate(
        ids, engine.backend.pixels(_image())[None], max_new_tokens=6, do_sample=False,
        pad_token_id=engine.tokenizer.pad_token_id,
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
    dicom = engine.backend.pixels(ASSETS / "ct_slice.dcm")
    assert dicom.shape == (3, 32, 32) and dicom.std() > 0.1


def test_concurrent_requests_are_decoded_in_one_batch_with_their_own_answers(engine):
    questions = ["Is there a circle in the image?", "What color is the shape?", "What shape is in the image?",
                 "Describe the image."]
    images = [_image(), Image.new("RGB", (32, 32), (0, 0, 250)), None, _image()]
    limits = [6, 3, 6, 5]
    cases = [([("human", q)], img, GenerationSettings(max_new_tokens=n))
             for q, img, n in zip(questions, images, limits)]
    expected = []
    for messages, image, settings in cases:
        info = GenerationInfo()
        expected.append((engine.answer(messages, image, settings, info=info), info.completion_tokens))
    sizes = len(engine.scheduler.batch_sizes)
    with engine.scheduler._cond:  # hold the worker until every request is queued: they form one batch
        jobs = [engine.submit(messages, image, settings) for messages, image, settings in cases * 2]
    got = [("".join(job.pieces()), len(job.generated)) for job in jobs]
    assert engine.scheduler.batch_sizes[sizes:] == [8]
    assert got == expected * 2  # left padding and per-row stopping change no answer
    assert all(n <= limit for (_, n), limit in zip(got, limits * 2))


def test_a_cancelled_request_leaves_the_others_and_the_queue_is_bounded(engine):
    messages = [("human", "What color is the shape?")]
    long = GenerationSettings(max_new_tokens=40)
    alone = engine.answer(messages, _image(), long)
    with engine.scheduler._cond:
        first, second = engine.submit(messages, _image(), long), engine.submit(messages, _image(), long)
    stream = first.pieces()
    next(stream, None)
    first.cancel()
    assert "".join(second.pieces()) == alone
    list(stream)
    assert first.finish_reason == "cancelled" and len(first.generated) < len(second.generated)

    small = InferenceEngine(engine.backend, max_queue=2)
    try:
        with small.scheduler._cond:
            small.submit(messages, None, SETTINGS)
            small.submit(messages, None, SETTINGS)
            with pytest.raises(QueueFullError, match="2 requests already waiting"):
                small.submit(messages, None, SETTINGS)
    finally:
        small.close()
    with pytest.raises(ServerClosingError):
        small.submit(messages, None, SETTINGS)


def test_prompts_beyond_the_context_are_refused_before_tokenizing(engine, monkeypatch):
    assert engine.context_length == 2048
    settings = GenerationSettings(max_new_tokens=48)
    calls = []
    monkeypatch.setattr(engine.backend, "encode_conversation", lambda *a, **k: calls.append(1))
    with pytest.raises(PromptTooLongError, match=r"1000000 characters cannot fit in the 2000 prompt tokens"):
        engine.submit([("human", "word " * 200000)], None, settings)
    with pytest.raises(PromptTooLongError):  # a long history counts too
        engine.submit([("human", "hi"), ("gpt", "x" * 10**6), ("human", "and?")], None, settings)
    assert calls == []
    monkeypatch.undo()
    n = len(engine.backend.encode_conversation([("human", "Colour?")], _image()).input_ids)
    with pytest.raises(PromptTooLongError, match=r"prompt tokens > 1952 allowed"):
        engine.submit([("human", "circle " * 2000)], None, GenerationSettings(max_new_tokens=96))
    capped = InferenceEngine(engine.backend, max_prompt_tokens=n + 5)
    try:
        with pytest.raises(PromptTooLongError, match="--max-prompt-tokens"):
            capped.submit([("human", "circle " * 40)], _image(), SETTINGS)
        assert capped.answer([("human", "Colour?")], _image(), SETTINGS) == engine.answer(
            [("human", "Colour?")], _image(), SETTINGS)
    finally:
        capped.close()


def test_quantised_loading_on_cpu_says_why(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(QuantizationUnavailableError, match="--load-4bit needs a CUDA GPU"):
        load_backend(str(tiny_model_dir), LoadOptions(bits=4))
    with pytest.raises(QuantizationUnavailableError, match="--load-8bit needs a CUDA GPU"):
        load_backend(str(tiny_model_dir), LoadOptions(bits=8))
    with pytest.raises(ValueError, match="neither an ExGra-Med checkpoint"):
        load_backend(str(tiny_model_dir / "vision"), LoadOptions(device="cpu"))
