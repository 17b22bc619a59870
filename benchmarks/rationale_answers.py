"""Rewrite the yes/no answers of a prepared easy-VQA train file as a short rationale ("red , blue , no").

An attempt at the demo's yes/no questions (README, demo section): each CLOSED answer first copies the colour or shape
the question names, then names the image's, then gives yes/no, so that the yes/no follows two words the model has just
written. The image's colour and shape come from the other questions about the same image
(`exgra_med.data.prepare.easy_vqa.image_facts`); a record whose question names no single colour or shape, or whose
image's value is unknown, keeps its answer. OPEN records are unchanged, and so are val/test: the reference's closed
rule scores a prediction by whether it contains the reference answer, and no colour or shape word contains "yes" or
"no".

    python -m benchmarks.rationale_answers --in runs/demo/data/train.json --out runs/demo/train_rationale.json
    FINETUNE_DATA=runs/demo/train_rationale.json FINETUNE_OUT=runs/demo/finetune_rationale \\
        bash scripts/demo_finetune.sh
Results: README, demo section.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from collections.abc import Sequence

FORMAT = "{question} , {image} , {answer}"


def _question(record: dict) -> str:
    """The question without `<image>` and without the yes/no suffix (whose "No" is not a negation)."""
    from exgra_med.data.prepare.vqa import CLOSED_YES_NO_SUFFIX
    from exgra_med.eval.generate import question_text

    return question_text(record).removesuffix(CLOSED_YES_NO_SUFFIX)


def rationale_answers(records: Sequence[dict], fmt: str = FORMAT) -> tuple[list[dict], int]:
    """Copies of `records` with rationale answers for the yes/no ones; returns them and how many changed."""
    from exgra_med.data.prepare.easy_vqa import COLORS, SHAPES, image_facts
    from exgra_med.eval.metrics import reference_answer

    per_image: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for record in records:
        per_image[record["image"]].append((_question(record), reference_answer(record)))
    facts = {image: image_facts(qas) for image, qas in per_image.items()}
    out, changed = [], 0
    for record in records:
        record = {**record, "conversations": [dict(t) for t in record["conversations"]]}
        out.append(record)
        if str(record.get("answer_type", "")).upper() != "CLOSED":
            continue
        named = [w for w in re.findall(r"[a-z]+", _question(record).lower()) if w in SHAPES or w in COLORS]
        if len(named) != 1:
            continue
        seen = facts[record["image"]].shape if named[0] in SHAPES else facts[record["image"]].color
        if seen is None:
            continue
        answer = record["conversations"][1]["value"]
        record["conversations"][1]["value"] = fmt.format(question=named[0], image=seen, answer=answer)
        changed += 1
    return out, changed


def main(argv: Sequence[str] | None = None) -> int:
    from exgra_med.io import read_json, write_json_atomic

    p = argparse.ArgumentParser(prog="python -m benchmarks.rationale_answers", description=__doc__.splitlines()[0])
    p.add_argument("--in", dest="src", required=True, help="prepared easy-VQA train.json")
    p.add_argument("--out", required=True, help="where the rewritten records go")
    p.add_argument("--format", default=FORMAT, help="answer format with {question}, {image} and {answer}")
    args = p.parse_args(argv)
    records = read_json(args.src)
    out, changed = rationale_answers(records, args.format)
    write_json_atomic(args.out, out)
    closed = sum(str(r.get("answer_type", "")).upper() == "CLOSED" for r in records)
    print(f"{changed} of {closed} yes/no answers rewritten -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
