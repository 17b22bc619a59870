"""Native-VLM stage 2 through scripts/stage2_vlm.sh under real 2-process launches on CPU: FSDP (the model's own layer
classes wrapped) and DeepSpeed ZeRO-3 train the same weights and alignment head as DDP; ZeRO-2 with LoRA saves a
plain checkpoint with the adapters folded in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from exgra_med.model.native.aligned import ALIGNMENT_WEIGHTS
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
ARGS = ["--bf16", "False", "--activation_checkpointing", "False", "--dataloader_num_workers", "0",
        "--per_device_train_batch_size", "2", "--logging_steps", "1", "--save_strategy", "no", "--use_cpu", "True",
        "--max_steps", "3", "--learning_rate", "1e-3"]

pytestmark = pytest.mark.slow


def _run(model: Path, data: Path, out: Path, port: int, *extra: str, **env_extra: str) -> Path:
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PATH=f"{bin_dir}:{os.environ['PATH']}",
               MODEL_PATH=str(model), DATA_PATH=str(data / "instruct.json"), IMAGE_FOLDER=str(data / "images"),
               OUTPUT_DIR=str(out), NPROC_PER_NODE="2", MASTER_PORT=str(port), **env_extra)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "stage2_vlm.sh"), *ARGS, *extra], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    state = json.loads((out / "trainer_state.json").read_text())
    steps = [h for h in state["log_history"] if "lm_loss" in h]
    assert [h["step"] for h in steps] == [1, 2, 3] and all("align_loss" in h for h in steps)
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return AutoModelForImageTextToText.from_pretrained(folder).state_dict()


def _assert_same_run(a: Path, b: Path, atol: float) -> None:
    wa, wb = _weights(a), _weights(b)
    assert set(wa) == set(wb)  # full (gathered) weights, not one rank's shard
    for name, value in wa.items():
        torch.testing.assert_close(wb[name], value, rtol=1e-5, atol=atol, msg=name)
    ha, hb = load_file(str(a / ALIGNMENT_WEIGHTS)), load_file(str(b / ALIGNMENT_WEIGHTS))
    assert set(ha) == set(hb) and ha
    for name, value in ha.items():
        torch.testing.assert_close(hb[name], value, rtol=1e-5, atol=atol, msg=name)


def test_fsdp_trains_what_ddp_trains(tiny_vlm, easy_vqa_dir, tmp_path):
    model = tiny_vlm("qwen2_5_vl")
    ddp = _run(model, easy_vqa_dir, tmp_path / "ddp", free_port())
    fsdp = _run(model, easy_vqa_dir, tmp_path / "fsdp", free_port(), FSDP="full_shard auto_wrap")
    _assert_same_run(ddp, fsdp, atol=1e-6)
    trained, initial = _weights(fsdp), _weights(model)
    assert any(not torch.equal(trained[k], initial[k]) for k in trained if "language_model.layers.1" in k)


def test_deepspeed_zero3_trains_what_ddp_trains(tiny_vlm, easy_vqa_dir, tmp_path):
    model = tiny_vlm("gemma3")
    ddp = _run(model, easy_vqa_dir, tmp_path / "ddp", free_port())
    zero3 = _run(model, easy_vqa_dir, tmp_path / "zero3", free_port(),
                 DEEPSPEED=str(REPO / "scripts" / "deepspeed" / "zero3.json"))
    _assert_same_run(ddp, zero3, atol=1e-5)


def test_deepspeed_zero2_with_lora_saves_merged_weights(tiny_vlm, easy_vqa_dir, tmp_path):
    model = tiny_vlm("llava_onevision")
    out = _run(model, easy_vqa_dir, tmp_path / "zero2_lora", free_port(), "--lora_enable", "True", "--lora_r", "4",
               DEEPSPEED=str(REPO / "scripts" / "deepspeed" / "zero2.json"))
    trained, initial = _weights(out), _weights(model)
    assert set(trained) == set(initial)
    key = next(k for k in trained if "language_model.layers.0.mlp.up_proj.weight" in k)
    assert not torch.equal(trained[key], initial[key])  # adapters folded in
    assert all(torch.isfinite(v).all() for v in trained.values())
