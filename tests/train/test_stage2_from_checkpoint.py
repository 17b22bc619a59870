"""Stage 2 with the alignment, started from an assembled ExGra-Med checkpoint (its head created while loading)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from exgra_med.train.main import main

ALIGN = ["--contrastive", "True", "--multi_graph", "True", "--after_de", "True"]
CPU = [
    "--bf16",
    "False",
    "--activation_checkpointing",
    "False",
    "--dataloader_num_workers",
    "0",
    "--logging_steps",
    "1",
    "--save_strategy",
    "no",
    "--use_cpu",
    "True",
    "--report_to",
    "none",
    "--seed",
    "0",
]


def _argv(model: Path, data: Path, out: Path, lr: str, steps: int = 3) -> list[str]:
    return [
        "--model_name_or_path",
        str(model),
        "--data_path",
        str(data / "instruct.json"),
        "--image_folder",
        str(data / "images"),
        "--output_dir",
        str(out),
        "--per_device_train_batch_size",
        "4",
        "--learning_rate",
        lr,
        "--max_steps",
        str(steps),
        *ALIGN,
        *CPU,
    ]


def _losses(out: Path) -> list[tuple[float, float]]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [(h["lm_loss"], h["align_loss"]) for h in history if "align_loss" in h]


def _assert_head_like_fresh(weights: dict[str, torch.Tensor], dim: int) -> None:
    bound = 1 / math.sqrt(dim)  # torch_geometric's U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    head = {k: v.float() for k, v in weights.items() if k.startswith("alignment.")}
    assert len(head) == 6, sorted(head)
    for name, value in head.items():
        assert torch.isfinite(value).all(), name
        assert float(value.abs().max()) <= bound * 1.01, name
        assert float(value.std()) == pytest.approx(bound / math.sqrt(3), rel=0.25), name


def test_stage2_from_assembled_checkpoint_trains_with_finite_losses(tiny_model_dir, easy_vqa_dir, tmp_path):
    out = tmp_path / "stage2"
    assert main(_argv(tiny_model_dir, easy_vqa_dir, out, "1e-3")) == 0
    losses = _losses(out)
    assert len(losses) == 3
    assert all(math.isfinite(lm) and math.isfinite(al) and al > 0 for lm, al in losses), losses
    weights = load_file(str(out / "model.safetensors"))
    assert all(torch.isfinite(v).all() for k, v in weights.items() if k.startswith("alignment."))
