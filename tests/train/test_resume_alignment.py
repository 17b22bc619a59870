"""A stage-2 run with the alignment, stopped after a checkpoint and resumed, ends bit-identical to an uninterrupted run:
the alignment's generator (edge noise, GNN dropout) is saved with every checkpoint and restored on resume."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from exgra_med.train.main import main
from exgra_med.train.trainer import ALIGN_RNG_PREFIX


def _argv(tiny_model_dir, data, out, extra=()):
    return [
        "--model_name_or_path", str(tiny_model_dir / "llm"), "--vision_tower", str(tiny_model_dir / "vision"),
        "--data_path", str(data / "instruct.json"), "--image_folder", str(data / "images"), "--output_dir", str(out),
        "--contrastive", "True", "--multi_graph", "True", "--after_de", "True",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--max_steps", "4",
        "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1", "--report_to", "none",
        "--dataloader_num_workers", "0", "--seed", "3", "--use_cpu", "True", *extra,
    ]


def test_resumed_alignment_run_is_bit_identical(tiny_model_dir, easy_vqa_dir, tmp_path):
    whole = tmp_path / "whole"
    assert main(_argv(tiny_model_dir, easy_vqa_dir, whole)) == 0
    assert (whole / "checkpoint-2" / f"{ALIGN_RNG_PREFIX}0.pth").is_file()

    # The interrupted run: everything it had written when it stopped after checkpoint-2.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    assert main(_argv(tiny_model_dir, easy_vqa_dir, resumed, ["--resume_from_checkpoint", "auto"])) == 0

    expected = load_file(str(whole / "model.safetensors"))
    got = load_file(str(resumed / "model.safetensors"))
    assert expected.keys() == got.keys() and any(k.startswith("alignment.") for k in got)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    logs = [json.loads((d / "trainer_state.json").read_text())["log_history"] for d in (whole, resumed)]
    align = [[h["align_loss"] for h in log if "align_loss" in h] for log in logs]
    assert len(align[0]) == 4 and align[1] == align[0]  # the resumed history holds steps 1-2 from the checkpoint
    # The run records the seed its alignment generator used (the run's --seed).
    assert json.loads((whole / "config.json").read_text())["alignment_config"]["seed"] == 3
    # Each modality's part of the alignment loss is logged, finite, and the parts average to the loss.
    for entry in (h for h in logs[0] if "align_loss" in h):
        parts = [entry[f"align_loss/{m}"] for m in ("image", "response", "extended")]
        assert all(math.isfinite(v) and 0.0 <= v <= 2.0 for v in parts), entry
        assert sum(parts) / 3 == pytest.approx(entry["align_loss"], abs=1e-5)
