"""What a training run reads before any model is loaded: its records and image headers checked, and the checkpoint
it resumes from."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from exgra_med.data.images import check_record_images
from exgra_med.data.records import RecordError, load_records
from exgra_med.errors import UserError
from exgra_med.train.args import DataArguments, ModelArguments

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
