"""`--padding_free True` under the distributed back ends, through scripts/stage2.sh with 2 processes on CPU (gloo):
FSDP and DeepSpeed ZeRO-2 on packed batches train the weights that DDP trains on padded ones (alignment on)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
ARGS = [
    "--bf16", "False", "--activation_checkpointing", "False", "--dataloader_num_workers", "0",
    "--per_device_train_batch_size", "3", "--logging_steps", "1", "--save_strategy", "no", "--use_cpu", "True",
    "--max_steps", "3", "--learning_rate", "1e-3", "--align_masked_mean", "True",
]


def _stage2(tiny_model_dir: Path, data: Path, projector: Path, out: Path, port: int, *extra: str, **env_extra):
    bin_dir = str(Path(sys.executable).parent)
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PATH=f"{bin_dir}:{os.environ['PATH']}",
        MODEL_PATH=str(tiny_model_dir / "llm"), VISION_TOWER=str(tiny_model_dir / "vision"),
        DATA_PATH=str(data / "instruct.json"), IMAGE_FOLDER=str(data / "images"), PROJECTOR=str(projector),
        OUTPUT_DIR=str(out), MASTER_PORT=str(port), NPROC_PER_NODE="2", **env_extra,
    )
    proc = subprocess.run(["bash", str(REPO / "scripts" / "stage2.sh"), *ARGS, *extra], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = [h for h in history if "lm_loss" in h]
    assert [h["step"] for h in steps] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor([h["lm_loss"], h["align_loss"]])).all() for h in steps)
    return out, steps


@pytest.fixture(scope="module")
def projector(stage1_projector):
    return stage1_projector


@pytest.fixture(scope="module")
def ddp_padded(tiny_model_dir, easy_vqa_dir, projector, tmp_path_factory):
    return _stage2(tiny_model_dir, easy_vqa_dir, projector, tmp_path_factory.mktemp("ddp") / "out", free_port())


def _assert_same_run(out: Path, steps: list[dict], reference: tuple[Path, list[dict]], atol: float) -> None:
    ref_out, ref_steps = reference
    for step, ref in zip(steps, ref_steps):
        for key in ("lm_loss", "align_loss"):
            assert step[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-5), (step["step"], key)
    weights, ref_weights = load_file(str(out / "model.safetensors")), load_file(str(ref_out / "model.safetensors"))
    assert weights.keys() == ref_weights.keys()
    for name, value in ref_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=atol, msg=name)


@pytest.mark.slow
def test_fsdp_on_packed_batches_trains_the_ddp_padded_weights(tiny_model_dir, easy_vqa_dir, projector, ddp_padded,
                                                              tmp_path):
    out, steps = _stage2(tiny_model_dir, easy_vqa_dir, projector, tmp_path / "fsdp", free_port(),
                         "--padding_free", "True", FSDP="full_shard auto_wrap")
    _assert_same_run(out, steps, ddp_padded, atol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("ninja") is None and not Path(sys.executable).with_name("ninja").exists(),
    reason="DeepSpeed needs ninja to build its CPU ops",
)
def test_deepspeed_zero2_on_packed_batches_trains_the_ddp_padded_weights(tiny_model_dir, easy_vqa_dir, projector,
                                                                         ddp_padded, tmp_path):
    pytest.importorskip("deepspeed")
    out, steps = _stage2(tiny_model_dir, easy_vqa_dir, projector, tmp_path / "zero2", free_port(),
                         "--padding_free", "True", DEEPSPEED=str(REPO / "scripts" / "deepspeed" / "zero2.json"))
    _assert_same_run(out, steps, ddp_padded, atol=1e-4)
