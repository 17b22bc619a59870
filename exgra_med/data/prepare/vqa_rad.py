"""VQA-RAD -> train / val / test VQA records (`exgra-med prepare vqa-rad`).

Accepted raw layouts under `--raw`:
- `trainset.json` + `testset.json` (the `data_RAD` release the reference converts), or
- the public `VQA_RAD Dataset Public.json`: records whose `phrase_type` starts with `test` form the
  test split, the others the training set.
Each raw record needs `qid, image_name, question, answer, answer_type`. The images folder is
`images/` or `VQA_RAD Image Folder/` (or `--images`). Val is a seeded split of the training set
(`--val-size 451` reproduces the size of the reference's split). Closed questions whose answer is
not yes/no keep answer_type CLOSED and get no suffix unless `--closed-options` lists their options.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from exgra_med.data.prepare.vqa import (
    add_common_arguments,
    as_id,
    check_images,
    link_images,
    load_closed_options,
    make_vqa_record,
    require,
    split_train_val,
    write_vqa_outputs,
)
from exgra_med.errors import HelpFormatter
from exgra_med.io import read_json

logger = logging.getLogger(__name__)

FIELDS = ("qid", "image_name", "question", "answer", "answer_type")
PUBLIC_JSON = "VQA_RAD Dataset Public.json"
IMAGE_DIRS = ("images", "VQA_RAD Image Folder")


def convert(raw_records: list, source: Path, options: dict[str, list[str]]) -> list[dict]:
    """Raw VQA-RAD records -> VQA records; a bad record raises naming file, record and field."""
    if not isinstance(raw_records, list):
        raise ValueError(f"{source}: expected a list of records")
    out = []
    for i, raw in enumerate(raw_records):
        require(raw, FIELDS, source, i)
        rid = as_id(raw["qid"])
        try:
            out.append(make_vqa_record(
                rid, str(raw["image_name"]), raw["question"], raw["answer"], raw["answer_type"],
                options.get(str(rid)),
            ))
        except ValueError as e:
            raise ValueError(f"{source}: record {i} field 'answer_type': {e}") from e
    return out


def load_raw(raw_dir: Path) -> tuple[list[dict], list[dict], list[Path]]:
    """(train-set raw records, test raw records, files read) from either accepted layout."""
    train_file, test_file = raw_dir / "trainset.json", raw_dir / "testset.json"
    if train_file.is_file() and test_file.is_file():
        return read_json(train_file), read_json(test_file), [train_file, test_file]
    public = raw_dir / PUBLIC_JSON
    if not public.is_file():
        raise FileNotFoundError(f"{raw_dir}: found neither trainset.json + testset.json nor {PUBLIC_JSON!r}")
    data = read_json(public)
    if not isinstance(data, list):
        raise ValueError(f"{public}: expected a list of records")
    for i, raw in enumerate(data):
        require(raw, ("phrase_type",), public, i)
    test = [r for r in data if str(r["phrase_type"]).startswith("test")]
    train = [r for r in data if not str(r["phrase_type"]).startswith("test")]
    return train, test, [public, public]


def find_images(raw_dir: Path, override: Path | None) -> Path:
    """The image folder: `--images` when given, else the first of `IMAGE_DIRS` that exists."""
    if override is not None:
        return override
    for name in IMAGE_DIRS:
        if (raw_dir / name).is_dir():
            return raw_dir / name
    raise FileNotFoundError(f"{raw_dir}: no image folder ({' or '.join(IMAGE_DIRS)}); pass --images")


def main(argv: Sequence[str] | None = None) -> int:
    """Convert a VQA-RAD release into train.json, val.json, test.json, candidate.json and images/."""
    parser = argparse.ArgumentParser(
        prog="exgra-med prepare vqa-rad", description=__doc__.split("\n")[0],
        formatter_class=HelpFormatter,
    )
    add_common_arguments(parser, val_fraction=0.25)
    parser.add_argument("--val-size", type=int, default=None, help="val count (overrides --val-fraction)")
    parser.add_argument("--images", type=Path, default=None, help="image folder (default: found in --raw)")
    args = parser.parse_args(argv)
    options = load_closed_options(args.closed_options)
    train_raw, test_raw, files = load_raw(args.raw)
    train_all = convert(train_raw, files[0], options)
    test = convert(test_raw, files[1], options)
    train, val = split_train_val(train_all, args.val_fraction, args.seed, val_size=args.val_size)
    images = find_images(args.raw, args.images)
    for name, records in (("train", train_all), ("test", test)):
        check_images(records, images, f"{args.raw} ({name})")
    counts = write_vqa_outputs(args.out, {"train": train, "val": val, "test": test})
    link_images(images, args.out, args.copy_images)
    print(f"vqa-rad: {counts} -> {args.out}")
    return 0
