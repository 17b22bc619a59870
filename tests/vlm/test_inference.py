"""Evaluation and serving on native VLMs: batched VQA answers equal batch-1 answers (per architecture), the eval
commands (generate-vqa, score, grounding-audit, zero-shot), and the serving engine behind chat / web / serve-api."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys

import pytest
import torch
from PIL import Image

from exgra_med.cli import main as cli
from exgra_med.eval.generate import generate_answers
from exgra_med.model.auto import LoadOptions, load_backend
from exgra_med.model.native.backend import NativeBackend
from exgra_med.serve.engine import GenerationInfo, GenerationSettings, InferenceEngine
from tests.conftest import start_api_server

QUESTIONS = 10


@pytest.fixture(scope="module")
def questions(easy_vqa_dir) -> list[dict]:
    return json.loads((easy_vqa_dir / "test.json").read_text())[:QUESTIONS]


def test_batched_vqa_answers_equal_batch_1_answers(arch, tiny_vlm, easy_vqa_dir, questions):
    native = load_backend(str(tiny_vlm(arch)), LoadOptions(device="cpu"))
    kwargs = {"max_new_tokens": 6, "image_folder": easy_vqa_dir / "images"}
    one = generate_answers(native, native.processor, None, questions, batch_size=1, **kwargs)
    batched = generate_answers(native, native.processor, None, questions, batch_size=4, **kwargs)
    assert set(one) == {str(q["id"]) for q in questions}
    assert batched == one
    # Not vacuous: the batch is left padded, and each row's next-token logits (which differ between prompts) are
    # those of the prompt alone.
    encoded = [native.encode_question(q, easy_vqa_dir / "images") for q in questions[:4]]
    inputs = native.batch_inputs(encoded)
    assert len({len(e.input_ids) for e in encoded}) > 1 and not inputs["attention_mask"].all()
    with torch.no_grad():
        rows = native.model(**inputs).logits[:, -1]
        alone = torch.stack([native.model(**native.batch_inputs([e])).logits[0, -1] for e in encoded])
    torch.testing.assert_close(rows, alone, rtol=1e-4, atol=1e-4)
    assert (alone[1:] - alone[0]).abs().amax() > 1e-3


def test_generate_vqa_score_grounding_audit_and_zero_shot_commands(tiny_vlm, easy_vqa_dir, questions, tmp_path):
    model, images = tiny_vlm("qwen2_5_vl"), easy_vqa_dir / "images"
    qfile = tmp_path / "questions.json"
    qfile.write_text(json.dumps(questions))
    answers = tmp_path / "answers.jsonl"
    common = ["--model", str(model), "--image-folder", str(images), "--max-new-tokens", "4", "--quiet"]
    assert cli(["generate-vqa", *common, "--question-file", str(qfile), "--answers-file", str(answers),
                "--batch-size", "4"]) == 0
    lines = [json.loads(x) for x in answers.read_text().splitlines()]
    assert [x["question_id"] for x in sorted(lines, key=lambda x: questions.index(
        next(q for q in questions if q["id"] == x["question_id"])))] == [q["id"] for q in questions]
    assert lines[0]["metadata"]["generation"]["conv_mode"] == "chat_template"  # recorded: the model's template
    native = load_backend(str(model), LoadOptions(device="cpu"))
    expected = generate_answers(native, native.processor, None, questions, batch_size=1, max_new_tokens=4,
                                image_folder=images)
    assert {str(x["question_id"]): x["text"] for x in lines} == expected

    scores = tmp_path / "scores.json"
    assert cli(["score", "--gt", str(qfile), "--pred", str(answers), "--candidate",
                str(easy_vqa_dir / "candidate.json"), "--json", str(scores)]) == 0
    assert "closed" in json.dumps(json.loads(scores.read_text())).lower()

    audit = tmp_path / "audit.json"
    assert cli(["grounding-audit", *common, "--question-file", str(qfile), "--candidate",
                str(easy_vqa_dir / "candidate.json"), "--out", str(audit)]) == 0
    assert json.loads(audit.read_text())["answers"]["real images"] == expected

    root = tmp_path / "omni"
    (root / "Images").mkdir(parents=True)
    shutil.copy(images / questions[0]["image"], root / "Images" / "a.png")
    items = [{"question_id": "z1", "question": "Which shape?", "gt_answer": "circle", "image_path": "Images/a.png",
              "option_A": "circle", "option_B": "triangle"}]
    (tmp_path / "omni.json").write_text(json.dumps(items))
    assert cli(["zero-shot", "--model", str(model), "--question-file", str(tmp_path / "omni.json"),
                "--image-folder", str(root), "--out", str(tmp_path / "zs"), "--max-new-tokens", "4", "--quiet"]) == 0
    results = json.loads((tmp_path / "zs" / "results.json").read_text())
    assert results["overall"]["total"] == 1 and results["overall"]["failed"] == 0

    # A project template (scripts/eval_vqa.sh passes `simple`) is ignored: a native model uses its own chat template.
    other = tmp_path / "b.jsonl"
    assert cli(["generate-vqa", *common, "--question-file", str(qfile), "--answers-file", str(other),
                "--conv-mode", "simple"]) == 0
    rows = [json.loads(x) for x in other.read_text().splitlines()]
    assert {str(x["question_id"]): x["text"] for x in rows} == expected
    assert rows[0]["metadata"]["generation"]["conv_mode"] == "chat_template"


def test_serving_engine_batches_requests_with_the_answers_of_single_requests(arch, tiny_vlm, easy_vqa_dir):
    engine = InferenceEngine.from_path(str(tiny_vlm(arch)), LoadOptions(device="cpu"))
    assert isinstance(engine.backend, NativeBackend)
    image = easy_vqa_dir / "images" / sorted(os.listdir(easy_vqa_dir / "images"))[0]
    settings = GenerationSettings(max_new_tokens=6)
    asks = ["What color is the shape?", "Is there a circle?", "What shape is it?"]
    single = [engine.answer([("human", q)], image, settings) for q in asks]
    sizes = len(engine.scheduler.batch_sizes)
    with engine.scheduler._cond:  # hold the worker until every request is queued: they form one batch
        jobs = [engine.submit([("human", q)], image, settings) for q in asks]
    assert ["".join(job.pieces()) for job in jobs] == single
    assert engine.scheduler.batch_sizes[sizes:] == [3]
    info = GenerationInfo()
    text = engine.answer([("human", asks[0]), ("gpt", single[0]), ("human", asks[1])], image, settings, info=info)
    assert isinstance(text, str) and info.completion_tokens <= 6 and info.prompt_tokens > 10
    assert engine.eos_token_ids == load_backend(str(tiny_vlm(arch)), LoadOptions(device="cpu")).eos_token_ids
    engine.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_api_and_web_answer_like_the_engine(tiny_vlm, easy_vqa_dir):
    import openai
    from gradio_client import Client, handle_file

    from exgra_med.serve.web import _text, launch_demo

    model = tiny_vlm("gemma3")
    image = easy_vqa_dir / "images" / sorted(os.listdir(easy_vqa_dir / "images"))[0]
    engine = InferenceEngine.from_path(str(model), LoadOptions(device="cpu"))
    expected = engine.answer([("human", "What color is the shape?")], image, GenerationSettings(max_new_tokens=5))

    app, url = launch_demo(engine, "127.0.0.1", _free_port(), GenerationSettings(max_new_tokens=5), examples_dir=None)
    try:
        _, chat = Client(url, verbose=False).predict("What color is the shape?", handle_file(str(image)), [],
                                                     api_name="/respond")
        assert _text(chat[-1]["content"]) == expected
    finally:
        app.close()
        engine.close()

    proc, base = start_api_server(model, "--max-new-tokens", "5", drain=True)
    try:
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)
        import base64
        import io

        buf = io.BytesIO()
        Image.open(image).save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        messages = [{"role": "user", "content": [{"type": "text", "text": "What color is the shape?"},
                                                 {"type": "image_url", "image_url": {"url": url}}]}]
        reply = client.chat.completions.create(model=model.name, messages=messages, max_tokens=5, temperature=0)
        assert reply.choices[0].message.content == expected
        stream = client.chat.completions.create(model=model.name, messages=messages, max_tokens=5, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_chat_in_a_terminal_answers_like_the_engine(tiny_vlm, easy_vqa_dir):
    from tests.serve.test_chat_terminal import Terminal

    model = tiny_vlm("llava_onevision")
    image = easy_vqa_dir / "images" / sorted(os.listdir(easy_vqa_dir / "images"))[0]
    engine = InferenceEngine.from_path(str(model), LoadOptions(device="cpu"))
    settings = GenerationSettings(max_new_tokens=5)
    q1, q2 = "What shape is in the image?", "What color is it?"
    a1 = engine.answer([("human", q1)], image, settings)
    a2 = engine.answer([("human", q1), ("gpt", a1), ("human", q2)], image, settings)
    engine.close()
    term = Terminal([sys.executable, "-m", "exgra_med.cli", "chat", "--model", str(model), "--image", str(image),
                     "--max-new-tokens", "5"])
    try:
        assert f"image loaded: {image}" in term.expect("USER: ")
        for question, answer in ((q1, a1), (q2, a2)):
            term.send(question)
            term.expect("ASSISTANT: ")
            assert term.expect("\nUSER: ").strip() == answer
        term.send("/exit")
    finally:
        assert term.close() == 0


def test_quantised_serving_keeps_the_vision_side_unquantised(tiny_vlm, monkeypatch):
    """--load-4bit: bitsandbytes is asked to leave the vision encoder, projector / merger and head in full precision
    (the loading itself needs CUDA; here it is intercepted)."""
    import torch

    pytest.importorskip("bitsandbytes")
    from exgra_med.model import auto

    seen = {}

    def fake_load(path, dtype=None, device=None, attn_implementation="sdpa", quantization_config=None):
        seen["config"] = quantization_config
        raise RuntimeError("stop here")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(auto, "load_native", fake_load)
    with pytest.raises(RuntimeError, match="stop here"):
        InferenceEngine.from_path(str(tiny_vlm("qwen2_5_vl")), LoadOptions(bits=4, device="cuda"))
    from transformers.quantizers.quantizers_utils import should_convert_module

    config = seen["config"]
    assert config.load_in_4bit
    for kept in ("model.visual.blocks.0.attn.qkv", "model.visual.merger.mlp.0", "lm_head",
                 "model.multi_modal_projector.linear_1", "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1"):
        assert not should_convert_module(kept, config.llm_int8_skip_modules), kept
    assert should_convert_module("model.language_model.layers.0.mlp.up_proj", config.llm_int8_skip_modules)


def test_a_hub_id_in_the_cache_is_served_and_evaluated(tiny_vlm, easy_vqa_dir, questions, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from tests.conftest import publish_to_hub_cache

    cache = tmp_path / "hub"
    publish_to_hub_cache(cache, tiny_vlm("gemma3"), "acme/tiny-gemma3")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    engine = InferenceEngine.from_path("acme/tiny-gemma3", LoadOptions(device="cpu"))
    assert isinstance(engine.backend, NativeBackend) and engine.name == "acme/tiny-gemma3"
    engine.close()
    qfile = tmp_path / "q.json"
    qfile.write_text(json.dumps(questions[:3]))
    answers = tmp_path / "a.jsonl"
    assert cli(["generate-vqa", "--model", "acme/tiny-gemma3", "--question-file", str(qfile), "--image-folder",
                str(easy_vqa_dir / "images"), "--answers-file", str(answers), "--max-new-tokens", "3", "--quiet"]) == 0
    line = json.loads(answers.read_text().splitlines()[0])
    assert line["metadata"]["generation"]["model"] == "acme/tiny-gemma3"
    assert line["metadata"]["generation"]["conv_mode"] == "chat_template"
