"""What a training run reads before any model is loaded: the vision tower's and projector's files, its records and
images checked (bad records dropped on request), and the checkpoint it resumes from."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from exgra_med.data.images import (
    BadImage,
    ImageLoadError,
    check_record_images,
    find_bad_images,
    image_check_mode,
)
from exgra_med.data.records import RecordError, load_records, record_images
from exgra_med.errors import UserError
from exgra_med.model.checkpoint import weight_files
from exgra_med.model.hub import OPEN_CLIP_HUB_PREFIX, HubResolutionError, resolve_path, resolve_vision_tower
from exgra_med.model.loading import PROJECTOR_FILES
from exgra_med.model.vision import OPEN_CLIP_CONFIG, OPEN_CLIP_PREFIX, OPEN_CLIP_WEIGHTS
from exgra_med.train.args import DataArguments, ModelArguments, TrainingArguments

logger = logging.getLogger(__name__)


def _looks_local(path: str) -> bool:
    """A path that cannot be a Hub id (absolute, relative with ./ or ../, ~, or more than one `/`)."""
    return path.startswith(("/", "./", "../", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path


# The vision configs `exgra_med.model.vision.load_vision_tower` builds a tower from (a full CLIP/SigLIP config: its
# vision_config); open_clip towers are told by their open_clip_config.json.
HF_VISION_TYPES = ("clip_vision_model", "siglip_vision_model")
_VISION_OF = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}
DROPPED_RECORDS_FILE = "dropped_records.jsonl"


def _resolved(flag: str, value: str, resolve: Callable[[str], str]) -> str:
    """`resolve(value)`, a Hub miss (not cached offline, unknown, gated) as one line naming the flag."""
    try:
        return resolve(value)
    except HubResolutionError as e:
        reason = str(e).removeprefix(f"{value.removeprefix(OPEN_CLIP_HUB_PREFIX)}: ")
        raise UserError(f"{flag} {value}: {reason}") from None


def _read_config(flag: str, value: str, file: Path) -> dict:
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{flag} {value}: cannot read {file}: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"{flag} {value}: {file} is not a JSON object")
    return config


def check_vision_tower(value: str | None) -> None:
    """`--vision_tower` as the loader will read it, from its config files alone (no weights): a local or cached Hub
    folder (offline: from the cache) holding a CLIP/SigLIP vision config, or an open_clip folder, with weights."""
    if not value:
        return
    flag = "--vision_tower"
    path = _resolved(flag, value, resolve_vision_tower)
    folder = Path(path.removeprefix(OPEN_CLIP_PREFIX)).expanduser()
    if not folder.is_dir():
        what = "no such folder" if not folder.exists() else "a file; expected a vision tower folder"
        raise UserError(f"{flag} {value}: {what}")
    if path.startswith(OPEN_CLIP_PREFIX) or (folder / OPEN_CLIP_CONFIG).is_file():
        if not (folder / OPEN_CLIP_CONFIG).is_file():
            raise UserError(f"{flag} {value}: no {OPEN_CLIP_CONFIG} in {folder} (an open_clip tower such as "
                            "BiomedCLIP)")
        config = _read_config(flag, value, folder / OPEN_CLIP_CONFIG)
        if not isinstance(config.get("model_cfg"), dict) or "vision_cfg" not in config["model_cfg"]:
            raise UserError(f"{flag} {value}: {folder / OPEN_CLIP_CONFIG} has no model_cfg.vision_cfg")
        if not any((folder / name).is_file() for name in OPEN_CLIP_WEIGHTS):
            raise UserError(f"{flag} {value}: no weights in {folder} (none of {', '.join(OPEN_CLIP_WEIGHTS)})")
    else:
        if not (folder / "config.json").is_file():
            raise UserError(f"{flag} {value}: no config.json in {folder}; expected a CLIP or SigLIP vision model")
        config = _read_config(flag, value, folder / "config.json")
        top = config.get("model_type")
        vision = config.get("vision_config") if isinstance(config.get("vision_config"), dict) else config
        kind = vision.get("model_type") or _VISION_OF.get(top)
        if kind not in HF_VISION_TYPES:
            raise UserError(f"{flag} {value}: model_type {top!r} is not a vision tower the loader supports (a CLIP or "
                            f"SigLIP vision model, or an open_clip tower as {OPEN_CLIP_PREFIX}DIR or "
                            f"{OPEN_CLIP_HUB_PREFIX}OWNER/NAME)")
        try:
            weight_files(folder)  # the files transformers loads the tower from
        except FileNotFoundError as e:
            raise UserError(f"{flag} {value}: {e}") from e


def check_projector(value: str | None) -> None:
    """`--pretrain_mm_mlp_adapter`: a projector file, or a local or cached Hub folder holding mm_projector.safetensors
    or mm_projector.bin."""
    if not value:
        return
    flag = "--pretrain_mm_mlp_adapter"
    local = Path(value).expanduser()
    if _looks_local(value) and not local.exists():
        raise UserError(f"{flag} {value}: no such file or folder")
    if local.exists():
        if local.is_dir() and not any((local / name).is_file() for name in PROJECTOR_FILES):
            raise UserError(f"{flag} {value}: holds no {' or '.join(PROJECTOR_FILES)} (a stage-1 output folder)")
        return
    _resolved(flag, value, lambda name: resolve_path(name, "projector", require=PROJECTOR_FILES))


def validate_inputs(model_args: ModelArguments, data_args: DataArguments, alignment: bool,
                    multi_image: bool = False, output_dir: str | os.PathLike | None = None) -> list[dict]:
    """Everything that can be checked before a model is loaded: the model folder, the vision tower and projector
    (`check_vision_tower`, `check_projector`), every record (schema, and `conversations_long` with the alignment;
    `multi_image`: image lists allowed), the image folder and every image (`--image_check`). Returns the records to
    train on: with `--drop_bad_records`, those whose images pass (the others listed in `output_dir`); errors name file
    and record."""
    path = model_args.model_name_or_path
    if path and _looks_local(path) and not os.path.exists(path):
        raise UserError(f"--model_name_or_path {path}: no such file or folder")
    check_vision_tower(model_args.vision_tower)
    check_projector(model_args.pretrain_mm_mlp_adapter)
    records = load_records(data_args.data_path, require_long=alignment, multi_image=multi_image)
    if not records:
        raise RecordError(f"{data_args.data_path}: holds no records; nothing to train on")
    n_images = sum(len(record_images(r)) for r in records)
    if n_images:
        if data_args.image_folder is None:
            raise UserError(f"{data_args.data_path}: {n_images} record images; pass --image_folder")
        if not os.path.isdir(data_args.image_folder):
            raise UserError(f"--image_folder {data_args.image_folder}: no such folder")
        mode = image_check_mode(data_args.image_check, n_images)
        if mode == "none":
            logger.info("--image_check none: the %d images are read only when batches reach them", n_images)
            return records
        rank0 = int(os.environ.get("LOCAL_RANK", "0")) == 0
        # Every rank checks (all must keep the same records): the cores are shared among the ranks of a machine.
        workers = max(1, min(8, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        if data_args.drop_bad_records:
            bad = find_bad_images(records, data_args.image_folder, mode, progress=rank0, workers=workers)
            records = drop_bad_records(records, bad, data_args.data_path, output_dir)
        else:
            try:
                check_record_images(records, data_args.image_folder, data_args.data_path, progress=rank0, mode=mode,
                                    workers=workers)
            except ImageLoadError as e:
                raise type(e)(f"{e}; --drop_bad_records True trains on the other records") from e
        logger.info("%s: %d records, %d images checked (%s)", data_args.data_path, len(records), n_images, mode)
    return records


def drop_bad_records(records: list[dict], bad: list[BadImage], source: str,
                     output_dir: str | os.PathLike | None) -> list[dict]:
    """`records` without those that have a bad image, each logged (file, record, field, reason) and all listed in
    OUTPUT_DIR/dropped_records.jsonl (written by rank 0); refuses when none is left."""
    for b in bad:
        logger.warning("%s: %s; record dropped", b.where(records, source), b.reason)
    dropped = {b.index for b in bad}
    kept = [r for i, r in enumerate(records) if i not in dropped]
    if not kept:
        raise UserError(f"--drop_bad_records: all {len(records)} records of {source} have a bad image and were "
                        "dropped; nothing to train on")
    listed = ""
    if output_dir is not None and int(os.environ.get("RANK", "0")) == 0:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"data_path": source, "index": b.index, "record": b.record_id, "field": b.field,
                             "file": b.file, "reason": b.reason}) + "\n" for b in bad]
        (out / DROPPED_RECORDS_FILE).write_text("".join(lines))
        listed = f"; listed in {out / DROPPED_RECORDS_FILE}"
    logger.warning("%s: dropped %d of %d records (bad images)%s", source, len(dropped), len(records), listed)
    return kept


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
