"""The VQA record format shared by every prepared data set (METHOD section 6) and helpers the
VQA-RAD / SLAKE / PathVQA converters share: field checks, splits, candidate list, image folder."""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from exgra_med.constants import DEFAULT_IMAGE_TOKEN
from exgra_med.io import read_json, write_json_atomic

logger = logging.getLogger(__name__)

# The reference appends this (with its final period) to closed yes/no questions.
CLOSED_YES_NO_SUFFIX = ' (Answer with either "Yes" or "No").'


def is_yes_no(answer: Any) -> bool:
    """True when `answer` is a yes/no answer (case and surrounding space ignored)."""
    return str(answer).strip().lower() in {"yes", "no"}


def options_suffix(options: Sequence[str]) -> str:
    """The reference's suffix for a closed question with given options: ` (Answer with either "a" or "b").`"""
    return " (Answer with either {}).".format(" or ".join(f'"{o}"' for o in options))


def make_vqa_record(
    record_id: str | int,
    image: str,
    question: str,
    answer: Any,
    answer_type: str,
    options: Sequence[str] | None = None,
) -> dict:
    """One VQA record: the question (+ option suffix for closed questions) then `<image>`.

    Closed yes/no questions get `CLOSED_YES_NO_SUFFIX`. Other closed questions get the suffix of
    `options` when given (the reference typed these on stdin), otherwise no suffix: they stay CLOSED
    and are scored by the closed (substring) rule.
    """
    answer_type = str(answer_type).strip().upper()
    if answer_type not in {"OPEN", "CLOSED"}:
        raise ValueError(f"record {record_id}: answer_type must be OPEN or CLOSED, got {answer_type!r}")
    question = str(question).strip()
    if answer_type == "CLOSED":
        if is_yes_no(answer):
            question += CLOSED_YES_NO_SUFFIX
        elif options:
            question += options_suffix(options)
    return {
        "id": record_id,
        "image": image,
        "answer_type": answer_type,
        "conversations": [
            {"from": "human", "value": f"{question}\n{DEFAULT_IMAGE_TOKEN}"},
            {"from": "gpt", "value": str(answer).strip()},
        ],
    }


def candidate_file(records: Sequence[dict]) -> dict[str, list[str]]:
    """The candidate list `{"0": [...]}` for open accuracy, built like the reference's
    `train_open_answers.json`: answers of OPEN records, lower-cased, distinct, in first-seen order.
    Pass the training records (train + val); the order matters because ties go to the first."""
    seen: dict[str, None] = {}
    for r in records:
        if r.get("answer_type") == "OPEN":
            seen.setdefault(str(r["conversations"][-1]["value"]).lower(), None)
    return {"0": list(seen)}


def split_train_val(
    records: Sequence[dict], val_fraction: float, seed: int, *, val_size: int | None = None
) -> tuple[list, list]:
    """Seeded split of `records` into (train, val); order within each split follows the input.
    `val_size` (a count, e.g. the reference's 451 for VQA-RAD) overrides `val_fraction`."""
    if val_size is None:
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        val_size = round(len(records) * val_fraction)
    elif not 0 <= val_size < max(len(records), 1):
        raise ValueError(f"val_size must be in [0, {len(records)}), got {val_size}")
    indices = list(range(len(records)))
    random.Random(seed).shuffle(indices)
    val_idx = set(indices[:val_size])
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val


def require(raw: Any, fields: Sequence[str], source: str | os.PathLike, index: int) -> None:
    """Raise a `ValueError` naming file, record and field when `raw` lacks one of `fields`."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: record {index} is a {type(raw).__name__}, expected an object")
    for field in fields:
        if field not in raw or raw[field] is None:
            rid = raw.get("qid", raw.get("img_id", raw.get("question_id", "?")))
            raise ValueError(f"{source}: record {index} (id {rid!r}) lacks field {field!r}")


def as_id(value: Any) -> int | str:
    """The reference stores ids as `int(qid)`; ids that are not integers are kept as text."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return str(value)


def load_closed_options(path: str | os.PathLike | None) -> dict[str, list[str]]:
    """Optional `{"<id>": ["opt1", "opt2"]}` file giving the options of non-yes/no closed questions."""
    if path is None:
        return {}
    data = read_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ValueError(f"{path}: expected an object mapping question ids to lists of options")
    return {str(k): [str(o) for o in v] for k, v in data.items()}


def check_unique_ids(records: Sequence[dict], split: str) -> None:
    """Raise when two records of one split share an id (the scorer matches answers by id)."""
    seen: set[str] = set()
    for r in records:
        key = str(r["id"])
        if key in seen:
            raise ValueError(f"{split}: duplicate record id {r['id']!r}")
        seen.add(key)


def check_images(records: Sequence[dict], image_root: Path, source: str) -> None:
    """Raise naming the first record whose image file is missing under `image_root`."""
    for r in records:
        if not (image_root / r["image"]).is_file():
            path = image_root / r["image"]
            raise FileNotFoundError(f"{source}: record {r['id']!r}: image {path} not found")


def link_images(src: Path, out_dir: Path, copy: bool) -> Path:
    """Make `out_dir/images` point at `src`: a symlink (default) or a full copy."""
    dest = out_dir / "images"
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    elif dest.is_dir():
        shutil.rmtree(dest)
    out_dir.mkdir(parents=True, exist_ok=True)
    if copy:
        tmp = out_dir / ".images.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        os.replace(tmp, dest)
    else:
        dest.symlink_to(src.resolve(), target_is_directory=True)
    return dest


def write_vqa_outputs(out_dir: Path, splits: Mapping[str, list[dict]]) -> dict[str, int]:
    """Write `{split}.json` for train / val / test and `candidate.json` (from train + val).
    Returns the record count of each file."""
    counts: dict[str, int] = {}
    for name in ("train", "val", "test"):
        records = splits.get(name, [])
        check_unique_ids(records, name)
        write_json_atomic(out_dir / f"{name}.json", records)
        counts[name] = len(records)
    candidates = candidate_file(list(splits.get("train", [])) + list(splits.get("val", [])))
    write_json_atomic(out_dir / "candidate.json", candidates)
    counts["candidates"] = len(candidates["0"])
    closed_other = sum(
        1 for rs in splits.values() for r in rs
        if r["answer_type"] == "CLOSED" and not is_yes_no(r["conversations"][1]["value"])
    )
    logger.info("wrote %s to %s (%d closed questions are not yes/no)", counts, out_dir, closed_other)
    return counts


def add_common_arguments(parser: argparse.ArgumentParser, val_fraction: float) -> None:
    """The options every VQA converter takes: --raw, --out, --val-fraction, --seed, --copy-images,
    --closed-options."""
    parser.add_argument("--raw", required=True, type=Path, help="folder of the raw release")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--val-fraction", type=float, default=val_fraction,
        help=f"fraction of train held out as val when the release has no val split (default {val_fraction})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    parser.add_argument("--copy-images", action="store_true", help="copy images instead of symlinking")
    parser.add_argument(
        "--closed-options", type=Path, default=None,
        help='JSON {"<id>": [options]} for closed questions that are not yes/no (adds the option suffix)',
    )
