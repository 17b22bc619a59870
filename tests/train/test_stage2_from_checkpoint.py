"""Stage 2 with the alignment, started from an assembled ExGra-Med checkpoint (its head created while loading)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from exgra_med.train.main import main
from tests.conftest import free_port

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


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="DeepSpeed's CPU communicator")
def test_stage2_from_checkpoint_under_zero3(tiny_model_dir, easy_vqa_dir, tmp_path):
    """Two ranks under DeepSpeed ZeRO-3 (weights partitioned while loading): the head missing from the checkpoint
    is initialised like a fresh one (learning rate 0, so the saved head is the loaded one) and the losses are finite."""
    pytest.importorskip("deepspeed")
    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "zero3"
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PATH=f"{bin_dir}:{os.environ['PATH']}")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "exgra_med.train",
        *_argv(tiny_model_dir, easy_vqa_dir, out, "0", steps=2),
        "--per_device_train_batch_size",
        "2",
        "--deepspeed",
        str(repo / "scripts" / "deepspeed" / "zero3.json"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=repo)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    losses = _losses(out)
    assert len(losses) == 2 and all(math.isfinite(lm) and math.isfinite(al) for lm, al in losses), losses
    config = json.loads((out / "config.json").read_text())
    _assert_head_like_fresh(load_file(str(out / "model.safetensors")), config["text_config"]["hidden_size"])
