"""Stage 2 from an assembled ExGra-Med checkpoint under DeepSpeed ZeRO-3, two ranks (the one-process case:
tests/train/test_stage2_from_checkpoint.py). Modules named *distributed.py run one after another on one xdist worker
(tests/conftest.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import free_port
from tests.train.test_stage2_from_checkpoint import _argv, _assert_head_like_fresh, _losses


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
