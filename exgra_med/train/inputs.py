"""What a training run reads before any model is loaded: its records and image headers checked, and the checkpoint
it resumes from."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from exgra_med.data.images import check_record_images
from exgra_med.data.records import RecordError, load_records
from exgra_med.errors import UserError
from exgra_med.train.args import DataArguments, ModelArguments, TrainingArguments

logger = logging.getLogger(__name__)


def _looks_local(path: str) -> bool:
    """A path that cannot be a Hub id (absolute, relative with ./ or ../, ~, or more than one `/`)."""
    return path.startswith(("/", "./", "../", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path


def validate_inputs(model_args: ModelArguments, data_args: DataArguments, alignment: bool,
                    multi_image: bool = False) -> list[dict]:
    """Everything that can be checked before a model is loaded: the model and vision-tower folders, every record
    (schema, and `conversations_long` with the alignment; `multi_image`: image lists allowed), the image folder and
    every image's header (existence, format, canvas size), unless `--skip_image_check`. Returns the validated records;
    errors name file and record."""
    for flag, path in (("--model_name_or_path", model_args.model_name_or_path),
                       ("--vision_tower", model_args.vision_tower)):
        local = path.removeprefix("local-dir:") if path else None
        if local and (_looks_local(local) or path.startswith("local-dir:")) and not os.path.exists(local):
            raise UserError(f"{flag} {path}: no such file or folder")
    records = load_records(data_args.data_path, require_long=alignment, multi_image=multi_image)
    if not records:
        raise RecordError(f"{data_args.data_path}: holds no records; nothing to train on")
    n_images = sum("image" in r for r in records)
    if n_images:
        if data_args.image_folder is None:
            raise UserError(f"{data_args.data_path}: {n_images} records have an image; pass --image_folder")
        if not os.path.isdir(data_args.image_folder):
            raise UserError(f"--image_folder {data_args.image_folder}: no such folder")
        if data_args.skip_image_check:
            logger.info("--skip_image_check: the %d images are read only when batches reach them", n_images)
        else:
            rank0 = int(os.environ.get("LOCAL_RANK", "0")) == 0
            check_record_images(records, data_args.image_folder, data_args.data_path, progress=rank0)
            logger.info("%s: %d records, %d image headers checked", data_args.data_path, len(records), n_images)
    return records


# What a finished run leaves at the top of its output folder (stage 1: the projector and config.json).
FINISHED_RUN_FILES = ("config.json", "trainer_state.json", "mm_projector.safetensors", "mm_projector.bin")


def check_output_dir(model_args: ModelArguments, training_args: TrainingArguments) -> None:
    """Refuse, before anything is written, an `--output_dir` whose contents training would replace: an input of the
    run (the model, the vision tower, the stage-1 projector) or a folder that holds a trained model, unless
    `--overwrite_output_dir True`. Resuming (`--resume_from_checkpoint`) a run in its own folder goes on when it
    has a checkpoint to resume from."""
    if training_args.overwrite_output_dir:
        return
    out = Path(training_args.output_dir).expanduser().resolve()
    for flag, value in (("--model_name_or_path", model_args.model_name_or_path),
                        ("--vision_tower", model_args.vision_tower),
                        ("--pretrain_mm_mlp_adapter", model_args.pretrain_mm_mlp_adapter)):
        path = Path(value.removeprefix("local-dir:")).expanduser() if value else None
        if path is None or not path.exists():
            continue
        folder = path.resolve() if path.is_dir() else path.resolve().parent
        if folder == out:
            raise UserError(f"--output_dir {training_args.output_dir} is the {flag} folder; training would write over "
                            "its input: choose another --output_dir (or pass --overwrite_output_dir True)")
    finished = [name for name in FINISHED_RUN_FILES if (out / name).is_file()]
    if not finished:
        return
    resume = training_args.resume_from_checkpoint
    if resume not in (None, "", "False", "false"):
        if resume not in ("True", "true", "auto") or latest_complete_checkpoint(out) is not None:
            return  # continues this run (or another checkpoint the user named)
        raise UserError(f"--output_dir {training_args.output_dir} holds a trained model ({finished[0]}) and no "
                        "checkpoint-N to resume from; choose another --output_dir, or pass --overwrite_output_dir "
                        "True to replace it")
    raise UserError(f"--output_dir {training_args.output_dir} already holds a trained model ({finished[0]}); "
                    "choose another --output_dir, pass --resume_from_checkpoint auto to continue its run, or "
                    "--overwrite_output_dir True to replace it")


def latest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest `checkpoint-N` whose `trainer_state.json` exists (the Trainer writes it last, so a run killed while
    saving leaves an incomplete folder that must not be resumed from)."""
    done = [p for p in Path(output_dir).glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    done = [p for p in done if p.name.split("-")[-1].isdigit()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def resume_arg(value: str | None, output_dir: str) -> str | None:
    if value is None or value in ("False", "false", ""):
        return None
    if value in ("True", "true", "auto"):
        found = latest_complete_checkpoint(output_dir)
        if found is not None:
            logger.info("resuming from %s", found)
        return str(found) if found is not None else None
    return value
