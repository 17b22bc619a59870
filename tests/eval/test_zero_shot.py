"""OmniMedVQA zero-shot: prompt, option mapping, the reference's decoding, accuracy per file with failed items
counted wrong and dropped (the reference), resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from exgra_med.eval import generate as generate_module
from exgra_med.eval.zero_shot import (
    main,
    map_to_option,
    options_of,
    score_item,
    similarity,
    zero_shot_question,
)


def _item(qid, question, options, gt, image="img.png"):
    record = {"question_id": qid, "question": question, "gt_answer": gt, "image_path": image}
    record.update({f"option_{k}": v for k, v in zip("ABCD", options)})
    return record


def test_prompt_and_option_mapping_values():
    record = _item("q", "What is shown?", ["Malaria", "Normal"], "Normal")
    assert zero_shot_question(record) == (
        "What is shown?Here are 2 candidate answers:['Malaria', 'Normal'] Only return what you think is the "
        "correct answer from the candidate answers, do not return any other irrelevant text!"
    )
    assert options_of(_item("q", "Q", ["a", "b", "c"], "a")) == ["a", "b", "c"]
    assert similarity("abcd", "abce") == pytest.approx(0.75)  # 3 matching of 8 characters: 2 * 3 / 8
    assert map_to_option("abce", ["abcd", "xbce", "zzzz"]) == 0  # 0.75 twice: the first wins
    assert map_to_option("Normal", ["Malaria", "Normal"]) == 1
    assert map_to_option("the answer is normal", ["Malaria", "Normal"]) == 1  # 10/26 vs 4/27
    assert map_to_option("qqq", ["ab", "cd"]) is None  # nothing in common: no option, counted wrong
    assert score_item(record, "Normal")["is_correct"] is True
    assert score_item(record, "Malaria") == {"model_pred": "Malaria", "pred_option": "Malaria", "is_correct": False}
    assert score_item(record, "qqq")["is_correct"] is False
    assert score_item(record, None)["is_correct"] is False


@pytest.fixture()
def omnimed(easy_vqa_dir, tmp_path) -> tuple[Path, Path]:
    """(questions folder, image root): two files, one with an unreadable image and one 'BROKEN' question."""
    root = tmp_path / "OmniMedVQA"
    (root / "Images").mkdir(parents=True)
    shutil.copy(easy_vqa_dir / "images" / "test_1.png", root / "Images" / "img.png")
    (root / "Images" / "bad.png").write_bytes(b"not an image")
    questions = tmp_path / "questions"
    (questions / "A").mkdir(parents=True)
    first = [
        _item("a1", "Are these cells infected?", ["Malaria", "Normal"], "Normal", "Images/img.png"),
        _item("a2", "Are these blood cells infected?", ["Malaria", "Normal"], "Malaria", "Images/img.png"),
        _item("a3", "Which organism?", ["Malaria", "Normal", "Fungus"], "Malaria", "Images/img.png"),
    ]
    second = [
        _item("b1", "Which organism?", ["Malaria", "Normal"], "Malaria", "Images/bad.png"),
        _item("b2", "BROKEN question?", ["Malaria", "Normal"], "Malaria", "Images/img.png"),
        _item("b3", "What organism?", ["Malaria", "Normal"], "Normal", "Images/img.png"),
    ]
    (questions / "A" / "first.json").write_text(json.dumps(first))
    (questions / "second.json").write_text(json.dumps(second))
    return questions, root


def _argv(model, questions, root, out, max_new_tokens: int | None = 4):
    tokens = [] if max_new_tokens is None else ["--max-new-tokens", str(max_new_tokens)]
    return ["--model", str(model), "--question-file", str(questions), "--image-folder", str(root), "--out", str(out),
            "--batch-size", "4", "--quiet", *tokens]


def test_accuracy_per_file_with_failures_counted_wrong_and_dropped(tiny_model_dir, omnimed, tmp_path, monkeypatch):
    questions, root = omnimed
    asked: list[str] = []
    decoding: set[tuple] = set()

    def fake_generate(backend, prompt_batch, *args, broken=True, **kwargs):
        decoding.add((backend.template.name, *args))  # (conv_mode, max_new_tokens, temperature)
        prompts = backend.tokenizer.batch_decode([p.input_ids for p in prompt_batch])
        if broken and any("BROKEN" in p for p in prompts):
            raise RuntimeError("CUDA out of memory (simulated)")
        asked.extend(prompts)
        return ["the answer is normal" if "cells" in p else "Malaria" for p in prompts]

    monkeypatch.setattr(generate_module, "generate_batch", fake_generate)
    out = tmp_path / "out"
    assert main(_argv(tiny_model_dir, questions, root, out, max_new_tokens=None)) == 0
    assert decoding == {("simple", 256, 0.7)}  # the reference samples at T = 0.7, 256 new tokens
    results = json.loads((out / "results.json").read_text())
    assert results["decoding"] == {"temperature": 0.7, "max_new_tokens": 256, "top_p": 1.0, "seed": 0}
    first, second = results["files"]["A/first.json"], results["files"]["second.json"]
    assert (first["correct"], first["total"], first["failed"]) == (2, 3, [])  # a1, a3 right; a2 wrong
    assert first["accuracy"] == pytest.approx(200 / 3)
    assert (second["correct"], second["total"]) == (0, 3)  # b1 image, b2 generation failed; b3 wrong
    assert {f["question_id"]: f["error"].split(":")[0] for f in second["failed"]} == {"b1": "image", "b2": "generation"}
    assert (second["answered"], second["accuracy"], second["accuracy_reference"]) == (1, 0.0, 0.0)
    # Failures counted wrong (2 of 6) and dropped as the reference (2 of the 4 answered).
    assert results["overall"] == pytest.approx(
        {"accuracy": 100 / 3, "accuracy_reference": 50.0, "macro_accuracy": 100 / 3,
         "macro_accuracy_reference": (200 / 3 + 0) / 2, "correct": 2, "total": 6, "answered": 4, "failed": 2})
    lines = [json.loads(x) for x in (out / "predictions" / "second.jsonl").read_text().splitlines()]
    assert {x["question_id"]: x["is_correct"] for x in lines} == {"b1": False, "b2": False, "b3": False}
    assert len(asked) == 4  # a1 a2 a3 b3

    # A rerun retries only the failed items: b2 now answers "Malaria" (right), b1's image is still bad.
    asked.clear()
    monkeypatch.setattr(generate_module, "generate_batch", lambda *a, **k: fake_generate(*a, broken=False, **k))
    assert main(_argv(tiny_model_dir, questions, root, out)) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(asked) == 1 and "BROKEN" in asked[0]
    assert results["files"]["second.json"]["correct"] == 1
    assert [f["question_id"] for f in results["files"]["second.json"]["failed"]] == ["b1"]
    assert results["files"]["second.json"]["accuracy"] == pytest.approx(100 / 3)
    assert results["files"]["second.json"]["accuracy_reference"] == pytest.approx(50.0)
    assert results["overall"]["correct"] == 3 and results["overall"]["failed"] == 1
    assert results["overall"]["accuracy"] == pytest.approx(50.0)
    assert results["overall"]["accuracy_reference"] == pytest.approx(60.0)  # 3 of the 5 answered


def test_zero_shot_with_the_tiny_model(tiny_model_dir, omnimed, tmp_path):
    questions, root = omnimed
    out = tmp_path / "out"
    assert main(_argv(tiny_model_dir, questions / "second.json", root, out)) == 0
    results = json.loads((out / "results.json").read_text())
    summary = results["files"]["second.json"]
    assert summary["total"] == 3 and [f["question_id"] for f in summary["failed"]] == ["b1"]
    lines = {
        x["question_id"]: x for x in map(json.loads, (out / "predictions" / "second.jsonl").read_text().splitlines())
    }
    for qid in ("b2", "b3"):
        line = lines[qid]
        index = map_to_option(line["model_pred"], options_of(line))
        expected = index is not None and options_of(line)[index] == line["gt_answer"]
        assert line["is_correct"] == expected
    assert summary["correct"] == sum(lines[q]["is_correct"] for q in ("b2", "b3"))
    assert summary["accuracy"] == pytest.approx(100 * summary["correct"] / 3)
