"""SLAKE -> train / val / test VQA records (`exgra-med prepare slake`).

Raw layout under `--raw` (the Slake1.0 release): `train.json`, `validate.json`, `test.json` with
records `qid, img_name, question, answer, answer_type, q_lang`, and the image folder `imgs/`
(`img_name` is relative to it, e.g. `xmlab0/source.jpg`). Only English (`q_lang == "en"`) questions
are kept. SLAKE's own validation split is used; when `validate.json` is missing, val is a seeded
split of train. Non-yes/no closed questions stay CLOSED with no suffix unless `--closed-options`
lists their options.
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

FIELDS = ("qid", "img_name", "question", "answer", "answer_type", "q_lang")
SPLIT_FILES = {"train": "train.json", "val": "validate.json", "test": "test.json"}


def convert(path: Path, options: dict[str, list[str]]) -> list[dict]:
    """English records of one SLAKE split file as VQA records."""
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of records")
    out = []
    for i, raw in enumerate(data):
        require(raw, FIELDS, path, i)
        if raw["q_lang"] != "en":
            continue
        rid = as_id(raw["qid"])
        try:
            out.append(make_vqa_record(
                rid, str(raw["img_name"]), raw["question"], raw["answer"], raw["answer_type"],
                options.get(str(rid)),
            ))
        except ValueError as e:
            raise ValueError(f"{path}: record {i} field 'answer_type': {e}") from e
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Convert a SLAKE release into train.json, val.json, test.json, candidate.json and images/."""
    parser = argparse.ArgumentParser(
        prog="exgra-med prepare slake", description=__doc__.split("\n")[0],
        formatter_class=HelpFormatter,
    )
    add_common_arguments(parser, val_fraction=0.1)
    parser.add_argument("--images", type=Path, default=None, help="image folder (default: RAW/imgs)")
    args = parser.parse_args(argv)
    options = load_closed_options(args.closed_options)
    for name in ("train", "test"):
        if not (args.raw / SPLIT_FILES[name]).is_file():
            raise FileNotFoundError(f"{args.raw}: missing {SPLIT_FILES[name]}")
    splits = {name: convert(args.raw / SPLIT_FILES[name], options) for name in ("train", "test")}
    if (args.raw / SPLIT_FILES["val"]).is_file():
        splits["val"] = convert(args.raw / SPLIT_FILES["val"], options)
    else:
        logger.info("no %s: holding out %.0f%% of train as val", SPLIT_FILES["val"], 100 * args.val_fraction)
        splits["train"], splits["val"] = split_train_val(splits["train"], args.val_fraction, args.seed)
    images = args.images or args.raw / "imgs"
    if not images.is_dir():
        raise FileNotFoundError(f"{images}: SLAKE image folder not found; pass --images")
    for name, records in splits.items():
        check_images(records, images, f"{args.raw / SPLIT_FILES[name]}")
    counts = write_vqa_outputs(args.out, splits)
    link_images(images, args.out, args.copy_images)
    print(f"slake: {counts} -> {args.out}")
    return 0
