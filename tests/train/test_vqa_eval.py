"""In-training VQA scoring: eval_val_* logged at each evaluation, the best checkpoint loaded at the end,
test scored with the final model and its answers written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from exgra_med.eval.generate import generate_answers
from exgra_med.eval.metrics import load_predictions, vqa_train_metrics
from exgra_med.model.loading import load_pretrained
from exgra_med.train.main import main
from exgra_med.train.vqa_eval import check_eval_schedule, split_path


def _subset(src: Path, dst: Path, n: int) -> list[dict]:
    records = json.loads(src.read_text())[:n]
    dst.write_text(json.dumps(records))
    return records


def test_split_path_follows_the_reference_naming(tmp_path):
    train = tmp_path / "train_w_options_new.json"
    (tmp_path / "val_w_options_new.json").write_text("[]")
    assert split_path(str(train), None, "val") == str(tmp_path / "val_w_options_new.json")
    assert split_path(str(train), "given.json", "test") == "given.json"
    with pytest.raises(ValueError, match="--test_data_path"):
        split_path(str(train), None, "test")


def test_best_model_metric_without_val_scoring_fails_early():
    class Args:
        eval_strategy, load_best_model_at_end, metric_for_best_model = "epoch", True, "eval_val_average"

    with pytest.raises(ValueError, match="--evaluate_on_val True"):
        check_eval_schedule(Args(), None)


def test_val_scoring_keeps_the_best_checkpoint_and_scores_test(tiny_model_dir, easy_vqa_dir, tmp_path):
    val = _subset(easy_vqa_dir / "val.json", tmp_path / "val.json", 8)
    test = _subset(easy_vqa_dir / "test.json", tmp_path / "test.json", 6)
    out = tmp_path / "ft"
    argv = [
        "--model_name_or_path", str(tiny_model_dir), "--data_path", str(easy_vqa_dir / "train.json"),
        "--image_folder", str(easy_vqa_dir / "images"), "--output_dir", str(out), "--use_cpu", "True",
        "--per_device_train_batch_size", "4", "--max_steps", "4", "--learning_rate", "1e-5", "--seed", "0",
        "--report_to", "none", "--dataloader_num_workers", "0", "--logging_steps", "1",
        "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "2",
        "--load_best_model_at_end", "True", "--metric_for_best_model", "eval_val_average",
        "--evaluate_on_val", "True", "--val_data_path", str(tmp_path / "val.json"),
        "--evaluate_on_test", "True", "--test_data_path", str(tmp_path / "test.json"),
        "--eval_max_new_tokens", "4", "--eval_batch_size", "4",
    ]
    assert main(argv) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    evals = [h for h in state["log_history"] if "eval_val_average" in h]
    assert [h["step"] for h in evals] == [2, 4]
    for h in evals:
        assert 0.0 <= h["eval_val_open_recall"] <= 100 and 0.0 <= h["eval_val_closed_accuracy"] <= 100
        assert h["eval_val_average"] == pytest.approx((h["eval_val_open_recall"] + h["eval_val_closed_accuracy"]) / 2)

    # The logged value at step 4 is what the step-4 checkpoint answers on val.
    model, tokenizer, processor = load_pretrained(str(out / "checkpoint-4"), dtype=torch.float32)
    answers = generate_answers(model, tokenizer, processor, val, 4, "simple", 4, image_folder=easy_vqa_dir / "images")
    assert vqa_train_metrics(val, answers)["average"] == pytest.approx(evals[1]["eval_val_average"], abs=1e-3)

    # load_best_model_at_end: the saved model is the best checkpoint (the first on equal scores).
    best_step = 4 if evals[1]["eval_val_average"] > evals[0]["eval_val_average"] else 2
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best_step}")
    final, best = (
        load_file(str(out / "model.safetensors")),
        load_file(str(out / f"checkpoint-{best_step}" / "model.safetensors")),
    )
    other = load_file(str(out / f"checkpoint-{6 - best_step}" / "model.safetensors"))
    key = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(final[key], best[key]) and not torch.equal(final[key], other[key])

    # Test: answers file in question order, metrics saved and logged, and consistent with each other.
    lines = [json.loads(x) for x in (out / "test_answers.jsonl").read_text().splitlines()]
    assert [x["question_id"] for x in lines] == [r["id"] for r in test]
    model, tokenizer, processor = load_pretrained(str(out), dtype=torch.float32)
    again = generate_answers(model, tokenizer, processor, test, 1, "simple", 4, image_folder=easy_vqa_dir / "images")
    assert [x["text"] for x in lines] == [again[str(r["id"])] for r in test]
    assert any(x["text"] for x in lines), "a barely trained tiny model still writes some text"
    results = json.loads((out / "test_results.json").read_text())
    expected = vqa_train_metrics(test, load_predictions(str(out / "test_answers.jsonl")))
    assert results["eval_test_average"] == pytest.approx(expected["average"], abs=1e-3)
    assert any("eval_test_average" in h for h in state["log_history"])
