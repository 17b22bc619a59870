"""PathVQA -> train / val / test VQA records (`exgra-med prepare pathvqa`).

Two raw formats are accepted under `--raw`:
- the original release: pickles `{train,val,test}_vqa.pkl` (directly under `--raw` or in `qas/`),
  lists of `{img_id, sent, label, answer_type}`, images in `images/{split}/{img_id}.jpg`. The answer
  is the first key of `label`; `answer_type == "yes/no"` means CLOSED, anything else OPEN. The
  reference uses `img_id` as the record id, which repeats for every question on one image; here the
  id is `{img_id}_q{k}` (k-th question of that image in the file), so answers can be matched by id.
- the Hugging Face copy: parquet files named `train-*`, `validation-*` / `val-*`, `test-*` with
  columns `image {bytes, path}`, `question`, `answer`. Images are written to
  `OUT/images/{split}/{sha1 of the bytes}.{jpg|png}` (identical images written once), ids are
  `{split}_{row:06d}`, and a yes/no answer means CLOSED.
PathVQA has its own val split; if it is absent, val is a seeded split of train.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import pickle
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from exgra_med.data.prepare.vqa import (
    add_common_arguments,
    check_images,
    is_yes_no,
    link_images,
    load_closed_options,
    make_vqa_record,
    require,
    split_train_val,
    write_vqa_outputs,
)
from exgra_med.errors import HelpFormatter

logger = logging.getLogger(__name__)

PICKLE_FIELDS = ("img_id", "sent", "label", "answer_type")
PARQUET_FIELDS = ("image", "question", "answer")
SPLITS = ("train", "val", "test")
_PARQUET_PREFIX = {"train": "train", "validation": "val", "val": "val", "test": "test"}


def first_label(label: Any) -> str:
    """The answer stored in a pickle `label`: its first key / element (a plain string is kept whole)."""
    if isinstance(label, str):
        return label
    try:
        return str(next(iter(label)))
    except (TypeError, StopIteration):
        raise ValueError(f"label {label!r} holds no answer") from None


def convert_pickle(path: Path, split: str, options: dict[str, list[str]]) -> list[dict]:
    """Records of one PathVQA pickle; a bad record raises naming file, record and field."""
    with path.open("rb") as f:
        data = pickle.load(f)  # the official release is a pickle; only open files you trust
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of records")
    per_image: dict[str, int] = defaultdict(int)
    out = []
    for i, raw in enumerate(data):
        require(raw, PICKLE_FIELDS, path, i)
        try:
            answer = first_label(raw["label"])
        except ValueError as e:
            raise ValueError(f"{path}: record {i} (id {raw['img_id']!r}) field 'label': {e}") from e
        img_id = str(raw["img_id"])
        rid = f"{img_id}_q{per_image[img_id]}"
        per_image[img_id] += 1
        kind = "CLOSED" if raw["answer_type"] == "yes/no" else "OPEN"
        out.append(make_vqa_record(rid, f"{split}/{img_id}.jpg", raw["sent"], answer, kind, options.get(rid)))
    return out


def find_pickles(raw: Path) -> dict[str, Path]:
    """`{split: pickle}` for the splits present under `raw` or `raw/qas`."""
    found = {}
    for split in SPLITS:
        for folder in (raw, raw / "qas"):
            if (folder / f"{split}_vqa.pkl").is_file():
                found[split] = folder / f"{split}_vqa.pkl"
                break
    return found


def find_parquets(raw: Path) -> dict[str, list[Path]]:
    """`{split: [parquet files]}` by file-name prefix (train-, validation- / val-, test-)."""
    found: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(raw.rglob("*.parquet")):
        prefix = path.name.split("-")[0].split(".")[0].lower()
        if prefix in _PARQUET_PREFIX:
            found[_PARQUET_PREFIX[prefix]].append(path)
    return dict(found)


def _parquet_rows(paths: Sequence[Path]) -> Iterator[tuple[Path, int, dict]]:
    try:
        # lazy: pyarrow is optional (the dev extra); only PathVQA's parquet files need it
        import pyarrow.parquet as pq
    except ImportError as e:  # optional: only the Hugging Face copy needs it
        raise ImportError("reading PathVQA parquet files needs pyarrow: pip install pyarrow") from e
    for path in paths:
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for item in batch.to_pylist():
                yield path, row, item
                row += 1


def write_image(data: bytes, folder: Path) -> str:
    """Write image bytes once under `folder`, named by content hash; returns the file name."""
    with Image.open(io.BytesIO(data)) as im:
        ext = ".png" if im.format == "PNG" else ".jpg"
    name = hashlib.sha1(data).hexdigest() + ext
    dest = folder / name
    if not dest.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    return name


def convert_parquet(paths: Sequence[Path], split: str, image_root: Path, options: dict) -> list[dict]:
    """Records of one split of the parquet copy; images are written under `image_root/split`."""
    out = []
    for index, (path, row, item) in enumerate(_parquet_rows(paths)):
        require(item, PARQUET_FIELDS, path, row)
        image = item["image"]
        if not isinstance(image, dict) or not image.get("bytes"):
            raise ValueError(f"{path}: record {row} field 'image' has no bytes")
        try:
            name = write_image(image["bytes"], image_root / split)
        except OSError as e:
            raise ValueError(f"{path}: record {row} field 'image' is not a readable image: {e}") from e
        rid = f"{split}_{index:06d}"
        kind = "CLOSED" if is_yes_no(item["answer"]) else "OPEN"
        out.append(make_vqa_record(
            rid, f"{split}/{name}", item["question"], item["answer"], kind, options.get(rid)
        ))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Convert PathVQA (pickles or parquet) into train/val/test.json, candidate.json and images/."""
    parser = argparse.ArgumentParser(
        prog="exgra-med prepare pathvqa", description=__doc__.split("\n")[0],
        formatter_class=HelpFormatter,
    )
    add_common_arguments(parser, val_fraction=0.1)
    parser.add_argument("--images", type=Path, default=None, help="image folder of the pickle release")
    args = parser.parse_args(argv)
    options = load_closed_options(args.closed_options)
    pickles, parquets = find_pickles(args.raw), find_parquets(args.raw)
    if pickles:
        missing = [s for s in ("train", "test") if s not in pickles]
        if missing:
            raise FileNotFoundError(f"{args.raw}: missing {[s + '_vqa.pkl' for s in missing]}")
        splits = {s: convert_pickle(p, s, options) for s, p in pickles.items()}
        images = args.images or args.raw / "images"
        for split, records in splits.items():
            check_images(records, images, str(pickles[split]))
    elif parquets:
        missing = [s for s in ("train", "test") if s not in parquets]
        if missing:
            raise FileNotFoundError(f"{args.raw}: no parquet files for split(s) {missing}")
        images = args.out / "images"
        if images.is_symlink():
            images.unlink()
        splits = {s: convert_parquet(p, s, images, options) for s, p in parquets.items()}
    else:
        raise FileNotFoundError(f"{args.raw}: found neither {{train,test}}_vqa.pkl nor *.parquet files")
    if "val" not in splits:
        splits["train"], splits["val"] = split_train_val(splits["train"], args.val_fraction, args.seed)
    counts = write_vqa_outputs(args.out, splits)
    if pickles:
        link_images(images, args.out, args.copy_images)
    print(f"pathvqa: {counts} -> {args.out}")
    return 0
