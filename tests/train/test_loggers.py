"""`--report_to tensorboard`: the event files hold `lm_loss`, `align_loss` and the alignment's parts, step by step,
with the values of the run's log history."""

from __future__ import annotations

import json

import pytest

from exgra_med.train.main import main


def _scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(run_dir.glob("runs/*/events.out.tfevents.*"))
    assert files, f"no TensorBoard event file under {run_dir / 'runs'}"
    acc = EventAccumulator(str(files[0].parent))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_hold_both_losses_and_the_alignment_parts(tiny_model_dir, easy_vqa_dir, tmp_path):
    out = tmp_path / "stage2"
    argv = [
        "--model_name_or_path", str(tiny_model_dir / "llm"), "--vision_tower", str(tiny_model_dir / "vision"),
        "--data_path", str(easy_vqa_dir / "instruct.json"), "--image_folder", str(easy_vqa_dir / "images"),
        "--contrastive", "True", "--multi_graph", "True", "--after_de", "True", "--alpha", "1.0",
        "--learning_rate", "1e-3", "--max_steps", "3", "--per_device_train_batch_size", "4", "--logging_steps", "1",
        "--report_to", "tensorboard", "--dataloader_num_workers", "0", "--seed", "0", "--use_cpu", "True",
        "--save_strategy", "no", "--output_dir", str(out),
    ]
    assert main(argv) == 0
    scalars = _scalars(out)
    history = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "lm_loss" in h]
    assert [h["step"] for h in history] == [1, 2, 3]
    for name in ("loss", "lm_loss", "align_loss", "align_loss/image", "align_loss/response", "align_loss/extended"):
        tag = f"train/{name}"
        assert [step for step, _ in scalars[tag]] == [1, 2, 3], tag
        assert [value for _, value in scalars[tag]] == pytest.approx([h[name] for h in history], rel=1e-5), tag
    # The total is the sum the optimiser saw: lm + alpha * align.
    for (_, total), (_, lm), (_, align) in zip(scalars["train/loss"], scalars["train/lm_loss"],
                                               scalars["train/align_loss"]):
        assert total == pytest.approx(lm + align, rel=1e-4)
    assert all(value > 0 for _, value in scalars["train/align_loss"])
