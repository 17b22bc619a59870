"""OmniMedVQA -> zero-shot question files (`exgra-med prepare omnimedvqa`).

OmniMedVQA ships one JSON list per source data set (`QA_information/Open-access/<name>.json`), each
record with `question`, `option_A`, `option_B` (`option_C`, `option_D` when present), `gt_answer`
and `image_path` (relative to the release root). Every file under `--raw` is converted into a file
of the same relative path under `--out`: all fields are kept and a `question_id` is added. An
existing `question_id` is kept when it is unique in its file; otherwise the id is
`{file stem}_{index:05d}`, which depends only on the file name and the record's position.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from exgra_med.data.prepare.vqa import require
from exgra_med.errors import HelpFormatter
from exgra_med.io import read_json, write_json_atomic

logger = logging.getLogger(__name__)

FIELDS = ("question", "option_A", "option_B", "gt_answer", "image_path")


def convert_file(path: Path) -> list[dict]:
    """The records of one OmniMedVQA file with a stable `question_id`; checks that `gt_answer` is
    one of the options."""
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of records")
    for i, raw in enumerate(data):
        require(raw, FIELDS, path, i)
        options = [raw.get(f"option_{k}") for k in "ABCD" if raw.get(f"option_{k}") is not None]
        if raw["gt_answer"] not in options:
            raise ValueError(f"{path}: record {i} field 'gt_answer' {raw['gt_answer']!r} is not an option")
    given = [str(r.get("question_id")) for r in data if r.get("question_id") is not None]
    keep = len(given) == len(data) and len(set(given)) == len(given)
    return [
        {**raw, "question_id": raw["question_id"] if keep else f"{path.stem}_{i:05d}"}
        for i, raw in enumerate(data)
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Convert every OmniMedVQA JSON file under --raw (or one file) into --out."""
    parser = argparse.ArgumentParser(
        prog="exgra-med prepare omnimedvqa", description=__doc__.split("\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--raw", required=True, type=Path, help="a QA_information folder or one .json file")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    args = parser.parse_args(argv)
    files = [args.raw] if args.raw.is_file() else sorted(args.raw.rglob("*.json"))
    if not files:
        raise FileNotFoundError(f"{args.raw}: no .json files")
    total = 0
    for path in files:
        records = convert_file(path)
        rel = Path(path.name) if args.raw.is_file() else path.relative_to(args.raw)
        write_json_atomic(args.out / rel, records)
        total += len(records)
        logger.info("%s: %d questions", rel, len(records))
    print(f"omnimedvqa: {total} questions in {len(files)} files -> {args.out}")
    return 0
