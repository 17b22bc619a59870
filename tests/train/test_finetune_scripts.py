"""scripts/finetune.sh: flag and variable pass-through, a real CPU run (two ranks: test_finetune_distributed.py); which
recipe it launches: tests/train/test_launch_scripts.py; the demo's use of it: tests/examples/easy_vqa/test_demo.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, small_easy_vqa

REPO = Path(__file__).resolve().parents[2]


def _env(**extra) -> dict:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", **extra}


def _flags(argv: list[str]) -> dict[str, str]:
    """The last value of every `--flag value` pair (later flags override earlier ones, as HfArgumentParser does)."""
    out = {}
    for i, token in enumerate(argv):
        if token.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out[token[2:]] = argv[i + 1]
    return out


def cpu_flags(batch: int, every: int, eval_batch: int, new_tokens: int) -> list[str]:
    """finetune.sh's trainer flags of a 2-step CPU run: val scored and a checkpoint saved every `every` steps."""
    return ["--use_cpu", "True", "--bf16", "False", "--activation_checkpointing", "False",
            "--dataloader_num_workers", "0", "--max_steps", "2", "--per_device_train_batch_size", str(batch),
            "--eval_strategy", "steps", "--eval_steps", str(every), "--save_strategy", "steps", "--save_steps",
            str(every), "--eval_batch_size", str(eval_batch), "--eval_max_new_tokens", str(new_tokens)]


def _dry_run(tmp_path: Path, *args: str, **env) -> dict[str, str]:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for split in ("train", "val", "test"):
        (data / f"{split}.json").write_text("[]")
    # TORCHRUN=echo prints the command instead of launching it.
    result = subprocess.run(["bash", str(REPO / "scripts" / "finetune.sh"), *args], env=_env(
        TORCHRUN="echo", DATA_DIR=str(data), NPROC_PER_NODE="2", **env), capture_output=True, text=True, check=True)
    return _flags(result.stdout.split())


def test_extra_flags_and_variables_override(tmp_path):
    flags = _dry_run(tmp_path, "slake", "--learning_rate", "1e-4", "--max_steps", "3", EPOCHS="2", OUTPUT_DIR="o")
    assert flags["learning_rate"] == "1e-4" and flags["max_steps"] == "3"
    assert flags["num_train_epochs"] == "2" and flags["output_dir"] == "o"
    unknown = subprocess.run(
        ["bash", str(REPO / "scripts" / "finetune.sh"), "mydata"],
        env=_env(TORCHRUN="echo"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert unknown.returncode != 0 and "set LR" in unknown.stderr


@pytest.mark.slow
def test_finetune_script_runs_on_cpu(tiny_model_dir, easy_vqa_dir, tmp_path):
    data = small_easy_vqa(easy_vqa_dir, tmp_path / "data", {"train": 16, "val": 4, "test": 4})
    out = tmp_path / "ft"
    cpu = cpu_flags(batch=4, every=1, eval_batch=4, new_tokens=2)
    subprocess.run(
        ["bash", str(REPO / "scripts" / "finetune.sh"), "easy-vqa", *cpu],
        check=True,
        env=_env(
            MODEL_PATH=str(tiny_model_dir),
            DATA_DIR=str(data),
            OUTPUT_DIR=str(out),
            LR="1e-4",
            NPROC_PER_NODE="1",
            MASTER_PORT=str(free_port()),
        ),
    )
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "eval_val_average" in h] == [1, 2]
    assert "eval_test_average" in json.loads((out / "test_results.json").read_text())
    assert len((out / "test_answers.jsonl").read_text().splitlines()) == 4
