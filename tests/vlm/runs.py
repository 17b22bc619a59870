"""Helpers shared by the native-VLM tests: the flags of a short stage-2 run and its log."""

from __future__ import annotations

import json
from pathlib import Path

STAGE2_STEPS = 3


ALIGNMENT_FLAGS = ("--contrastive", "True", "--multi_graph", "True", "--after_de", "True")


def train_args(model: Path, data: Path, images: Path, out: Path, steps: int, *extra: str,
               alignment: bool = True) -> list[str]:
    """`exgra-med train` flags of a short CPU run: stage 2 with the ExGra-Med alignment, or without (fine-tuning)."""
    return [
        "--model_name_or_path", str(model), "--data_path", str(data), "--image_folder", str(images),
        *(ALIGNMENT_FLAGS if alignment else ()),
        "--output_dir", str(out), "--max_steps", str(steps), "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-3", "--logging_steps", "1", "--seed", "0", "--use_cpu", "True",
        "--save_strategy", "no", "--report_to", "none", "--dataloader_num_workers", "0", *extra,
    ]


def log_history(out: Path) -> list[dict]:
    """The Trainer's log lines of a finished run."""
    return json.loads((out / "trainer_state.json").read_text())["log_history"]
