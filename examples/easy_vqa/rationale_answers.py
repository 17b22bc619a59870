"""Rewrite the yes/no answers of a prepared easy-VQA train file as a short rationale ("red , blue , no").

An attempt at the demo's yes/no questions (README, demo section): each CLOSED answer first copies the colour or shape
the question names, then names the image's, then gives yes/no, so that the yes/no follows two words the model has just
written. The image's colour and shape come from the other questions about the same image
(`examples.easy_vqa.rationale.facts_per_image`); a record whose question names no single colour or shape, or whose
image's value is unknown, keeps its answer. OPEN records are unchanged, and so are val/test: the reference's closed
rule scores a prediction by whether it contains the reference answer, and no colour or shape word contains "yes" or
"no".

    python -m examples.easy_vqa.rationale_answers --in runs/demo/data/train.json --out runs/demo/train_rationale.json
    FINETUNE_DATA=runs/demo/train_rationale.json FINETUNE_OUT=runs/demo/finetune_rationale \\
        bash examples/easy_vqa/finetune_audit.sh
Results: README, demo section.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

FORMAT = "{asked} , {seen} , {answer}"


def rationale_answers(records: Sequence[dict], fmt: str = FORMAT) -> tuple[list[dict], int]:
    """Copies of `records` with rationale answers for the yes/no ones; returns them and how many changed.
    (`examples.easy_vqa.rationale.rationale_train_records` is the demo's version: the comparison and the
    question's mode written out too, yes/no balanced, fewer open questions.)"""
    from examples.easy_vqa.rationale import facts_per_image, rationale_answer, record_question

    facts = facts_per_image(records)
    out, changed = [], 0
    for record in records:
        record = {**record, "conversations": [dict(t) for t in record["conversations"]]}
        out.append(record)
        if str(record.get("answer_type", "")).upper() != "CLOSED":
            continue
        answer = rationale_answer(record_question(record), record["conversations"][1]["value"],
                                  facts[record["image"]], fmt)
        if answer is not None:
            record["conversations"][1]["value"] = answer
            changed += 1
    return out, changed


def main(argv: Sequence[str] | None = None) -> int:
    from exgra_med.io import read_json, write_json_atomic

    p = argparse.ArgumentParser(
        prog="python -m examples.easy_vqa.rationale_answers", description=__doc__.splitlines()[0]
    )
    p.add_argument("--in", dest="src", required=True, help="prepared easy-VQA train.json")
    p.add_argument("--out", required=True, help="where the rewritten records go")
    p.add_argument(
        "--format", default=FORMAT, help="answer format with {asked}, {seen}, {comparison}, {mode} and {answer}"
    )
    args = p.parse_args(argv)
    records = read_json(args.src)
    out, changed = rationale_answers(records, args.format)
    write_json_atomic(args.out, out)
    closed = sum(str(r.get("answer_type", "")).upper() == "CLOSED" for r in records)
    print(f"{changed} of {closed} yes/no answers rewritten -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
