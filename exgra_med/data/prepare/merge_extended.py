"""Merge extended captions into stage-2 records: `conversations` + `conversations_long` (METHOD section 3).

The original records keep their `conversations`; the extended records (from `exgra-med
extend-captions`) supply `conversations_long`. Both must have the same ids and, per id, the same turn
structure: same number of turns, same speakers, same human turns. Only gpt values may differ.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from exgra_med.data.extend import conversation_of, load_instruction_records
from exgra_med.errors import HelpFormatter
from exgra_med.io import write_json_atomic

logger = logging.getLogger(__name__)


def check_same_structure(rid: object, original: list[dict], extended: list[dict], source: Path) -> None:
    """Raise ValueError naming the record and turn where `extended` departs from `original`."""
    if len(original) != len(extended):
        raise ValueError(f"{source}: record {rid}: {len(extended)} turns, the original has {len(original)}")
    for i, (a, b) in enumerate(zip(original, extended)):
        if a["from"] != b["from"]:
            raise ValueError(
                f"{source}: record {rid}: turn {i} is from {b['from']!r}, the original's from {a['from']!r}"
            )
        if a["from"] == "human" and a["value"] != b["value"]:
            raise ValueError(f"{source}: record {rid}: human turn {i} differs from the original")
        if a["from"] == "gpt" and not b["value"].strip():
            raise ValueError(f"{source}: record {rid}: gpt turn {i} is empty")


def merge_extended(
    original: Sequence[dict],
    extended: Sequence[dict],
    extended_source: Path = Path("<extended>"),
    allow_missing: bool = False,
) -> tuple[list[dict], list[object]]:
    """(merged records in original order, ids without an extended version).

    Ids missing from `extended` are an error unless `allow_missing`, then they are dropped and returned.
    Extended ids that are not in `original` are always an error.
    """
    by_id = {str(r["id"]): r for r in extended}
    original_ids = {str(r["id"]) for r in original}
    extra = [i for i in by_id if i not in original_ids]
    if extra:
        raise ValueError(f"{extended_source}: {len(extra)} ids are not in the original, e.g. {extra[:3]}")
    merged, missing = [], []
    for record in original:
        ext = by_id.get(str(record["id"]))
        if ext is None:
            missing.append(record["id"])
            continue
        conv = conversation_of(record, "<original>")
        conv_long = conversation_of(ext, extended_source)
        check_same_structure(record["id"], conv, conv_long, extended_source)
        out = {k: v for k, v in record.items() if k != "conversatons"}
        out["conversations"] = conv
        out["conversations_long"] = [dict(t) for t in conv_long]
        merged.append(out)
    if missing and not allow_missing:
        raise ValueError(
            f"{extended_source}: {len(missing)} original ids have no extended version, e.g. {missing[:3]} "
            "(resume extend-captions, or pass --allow-missing to drop them)"
        )
    return merged, missing


def main(argv: Sequence[str] | None = None) -> int:
    """`exgra-med merge-extended --original F --extended F --out F [--allow-missing]`."""
    p = argparse.ArgumentParser(
        prog="exgra-med merge-extended", description=__doc__.split("\n")[0],
        formatter_class=HelpFormatter,
    )
    p.add_argument("--original", required=True, help="instruct records (.json / .jsonl)")
    p.add_argument("--extended", required=True, help="output of extend-captions")
    p.add_argument("--out", required=True, help="stage-2 records to write (JSON)")
    p.add_argument("--allow-missing", action="store_true", help="drop records that have no extended version")
    args = p.parse_args(argv)
    original = load_instruction_records(args.original)
    extended = load_instruction_records(args.extended)
    try:
        merged, missing = merge_extended(original, extended, Path(args.extended), args.allow_missing)
    except ValueError as e:
        print(f"merge-extended: {e}", file=sys.stderr)
        return 1
    if missing:
        logger.warning("dropped %d records without an extended version", len(missing))
    write_json_atomic(args.out, merged)
    print(f"merge-extended: {len(merged)} records -> {args.out} ({len(missing)} dropped)")
    return 0
