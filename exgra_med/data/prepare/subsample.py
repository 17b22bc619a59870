"""Seeded subsets of a record file (`exgra-med subsample`): a fraction, or K shots per group.

`--fraction F` keeps `max(1, floor(N * F))` records drawn without replacement, as the reference's
`fewshot_data_generation.py` does (it takes `int(N * percent / 100)`, unseeded); this is how the
10% / 40% pre-training subsets and the few-percent fine-tuning sets are made. `--shots K` keeps K
records per group (`--per answer_type`, the default, or `--per answer`: the lower-cased last gpt
turn); a group smaller than K is kept whole. `--balance-yes-no` keeps every open record and, for each yes/no
question text, as many "yes" as "no" records (the commoner answer drawn down, seeded): a question whose answer
its wording predicts (easy-VQA's "is there a red shape?" is "no" 7 times in 8) then teaches nothing without the
image, as VQA v2 balanced its questions against language priors. Selected records keep their input order.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from exgra_med.constants import DEFAULT_IMAGE_TOKEN
from exgra_med.errors import HelpFormatter
from exgra_med.io import read_json, write_json_atomic

logger = logging.getLogger(__name__)


def subsample_fraction(records: Sequence[Any], fraction: float, seed: int) -> list:
    """`max(1, floor(len * fraction))` records chosen with `random.Random(seed)`, in input order."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if not records:
        return []
    k = max(1, math.floor(len(records) * fraction))
    keep = set(random.Random(seed).sample(range(len(records)), k))
    return [r for i, r in enumerate(records) if i in keep]


def group_key(record: dict, per: str, index: int) -> str:
    """The group of a record for few-shot sampling: its answer_type or its (lower-cased) answer."""
    try:
        if per == "answer_type":
            return str(record["answer_type"])
        turns = record.get("conversations", record.get("conversatons"))
        return str(turns[-1]["value"]).strip().lower()
    except (KeyError, TypeError, IndexError):
        field = "answer_type" if per == "answer_type" else "conversations"
        raise ValueError(f"record {index} (id {record.get('id')!r}) lacks field {field!r}") from None


def subsample_shots(records: Sequence[dict], shots: int, seed: int, per: str = "answer_type") -> list:
    """K records per group (groups in first-seen order, one seeded draw each), in input order."""
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    if per not in ("answer_type", "answer"):
        raise ValueError(f"per must be 'answer_type' or 'answer', got {per!r}")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[group_key(r, per, i)].append(i)
    rng = random.Random(seed)
    keep: set[int] = set()
    for members in groups.values():
        keep.update(members if len(members) <= shots else rng.sample(members, shots))
    return [r for i, r in enumerate(records) if i in keep]


def question_text(record: dict, index: int) -> str:
    try:
        turns = record.get("conversations", record.get("conversatons"))
        return str(turns[0]["value"]).replace(DEFAULT_IMAGE_TOKEN, "").strip().lower()
    except (KeyError, TypeError, IndexError):
        raise ValueError(f"record {index} (id {record.get('id')!r}) lacks field 'conversations'") from None


def balance_yes_no(records: Sequence[dict], seed: int) -> list:
    """Every record whose answer is not yes/no, and per yes/no question text equally many "yes" and "no" records
    (a question asked with one answer only is dropped), in input order."""
    groups: dict[str, dict[str, list[int]]] = defaultdict(lambda: {"yes": [], "no": []})
    keep: set[int] = set()
    for i, r in enumerate(records):
        answer = group_key(r, "answer", i)
        if answer in ("yes", "no"):
            groups[question_text(r, i)][answer].append(i)
        else:
            keep.add(i)
    rng = random.Random(seed)
    for question in sorted(groups):
        yes, no = groups[question]["yes"], groups[question]["no"]
        n = min(len(yes), len(no))
        keep.update(rng.sample(yes, n) + rng.sample(no, n))
    return [r for i, r in enumerate(records) if i in keep]


def main(argv: Sequence[str] | None = None) -> int:
    """`exgra-med subsample --in F --out F (--fraction X | --shots K [--per ...]) [--seed S]`."""
    parser = argparse.ArgumentParser(
        prog="exgra-med subsample", description=__doc__.split("\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--in", dest="inp", required=True, type=Path, help="JSON list of records")
    parser.add_argument("--out", required=True, type=Path, help="output JSON file")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--fraction", type=float, help="keep this fraction, e.g. 0.1")
    mode.add_argument("--shots", type=int, help="keep this many records per group")
    mode.add_argument("--balance-yes-no", action="store_true",
                      help="keep open records, and per yes/no question text as many yes as no records")
    parser.add_argument("--per", choices=("answer_type", "answer"), default="answer_type",
                        help="the groups --shots counts in: answer type (open/closed) or answer")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random choice")
    args = parser.parse_args(argv)
    records = read_json(args.inp)
    if not isinstance(records, list):
        raise ValueError(f"{args.inp}: expected a list of records")
    if args.fraction is not None:
        subset = subsample_fraction(records, args.fraction, args.seed)
    elif args.balance_yes_no:
        subset = balance_yes_no(records, args.seed)
    else:
        subset = subsample_shots(records, args.shots, args.seed, args.per)
    write_json_atomic(args.out, subset)
    print(f"subsample: kept {len(subset)} of {len(records)} records -> {args.out}")
    return 0
