"""The demo's fine-tuning file: easy-VQA yes/no answers with the comparison worked out in words.

`train_rationale.json` holds a prepared `train.json`'s yes/no questions balanced per question text, each answered
with its reasoning ("Is there not a red shape?" on a blue circle -> "red blue different absent yes"), and a seeded
share of its open questions. Why (README, demo section): the demo's tiny random LLM does not learn to compare a word
of the question with the image when it must answer yes/no at once; with the steps written out it does.

    python -m examples.easy_vqa.rationale --in runs/demo/data/train.json --out runs/demo/data/train_rationale.json
"""

from __future__ import annotations

import argparse
import random
import re
from collections import defaultdict
from collections.abc import Sequence

from exgra_med.constants import DEFAULT_IMAGE_TOKEN
from exgra_med.data.prepare.easy_vqa import COLORS, NEGATION, SHAPES, ImageFacts, image_facts
from exgra_med.data.prepare.vqa import CLOSED_YES_NO_SUFFIX, is_yes_no

# No word before the answer contains "yes" or "no", so the reference's closed rule (the reference answer is a
# substring of the prediction) scores the final word. Words only, no separators: the comparison is then predicted at
# the seen word, right after the asked one (with " , " between them, the demo's 2-layer LLM learned it as a slower
# per-pair lookup; README, demo section).
RATIONALE = "{asked} {seen} {comparison} {mode} {answer}"
RATIONALE_FIELDS = ("asked", "seen", "comparison", "mode", "answer")
RATIONALE_WORDS = ("same", "different", "present", "absent")


def record_question(record: dict) -> str:
    """A prepared easy-VQA record's question in lower case, without `<image>` and the yes/no suffix (whose "No" is
    not a negation)."""
    try:
        text = str(record["conversations"][0]["value"])
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"record {record.get('id')!r}: needs 'conversations' with a question turn") from None
    return text.replace(DEFAULT_IMAGE_TOKEN, "").replace(CLOSED_YES_NO_SUFFIX.strip(), "").strip().lower()


def rationale_answer(question: str, answer: str, facts: ImageFacts, fmt: str = RATIONALE) -> str | None:
    """A yes/no answer with its reasoning in words: the colour or shape the question names, the image's, whether
    they are the same, whether the question asks for presence or absence, then the answer: "Is there not a red
    shape?" on a blue circle -> "red blue different absent yes". `question` as `record_question` gives it.
    None when the question names no single colour or shape, the image's is unknown, or the facts contradict the
    answer."""
    named = [w for w in re.findall(r"[a-z]+", question.lower()) if w in SHAPES or w in COLORS]
    if len(named) != 1 or not is_yes_no(answer):
        return None
    seen = facts.shape if named[0] in SHAPES else facts.color
    if seen is None:
        return None
    same, absent, yes = named[0] == seen, bool(NEGATION.search(question.lower())), answer.strip().lower() == "yes"
    if yes != (same != absent):
        return None
    same_word, different_word, present_word, absent_word = RATIONALE_WORDS
    return fmt.format(
        asked=named[0], seen=seen, comparison=same_word if same else different_word,
        mode=absent_word if absent else present_word, answer="yes" if yes else "no",
    )


def parse_rationale(text: str) -> dict[str, str] | None:
    """The steps of an answer in `RATIONALE`'s form ({"asked": "red", "seen": "blue", "comparison": "different",
    ...}; commas between the words are accepted), or None when it has not five words."""
    words = text.replace(",", " ").lower().split()
    return dict(zip(RATIONALE_FIELDS, words)) if len(words) == len(RATIONALE_FIELDS) else None


def facts_per_image(records: Sequence[dict]) -> dict[str, ImageFacts]:
    """`image_facts` of each image, from all the (question, answer) pairs of `records` about it."""
    per_image: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for record in records:
        per_image[record["image"]].append((record_question(record), str(record["conversations"][1]["value"])))
    return {image: image_facts(qas) for image, qas in per_image.items()}


def rationale_train_records(records: Sequence[dict], seed: int, open_fraction: float = 0.25) -> list[dict]:
    """The demo's fine-tuning records from train.json's: its yes/no questions balanced per question text
    (`exgra-med subsample --balance-yes-no`, which takes away the wording's prior: 86% of easy-VQA's yes/no answers
    follow from the question alone), each answered by `rationale_answer` (kept as is where that is None), and a
    seeded `open_fraction` of its open questions, in input order. Each image's facts come from all its `records`.
    Four in five questions yes/no: with half of them open the demo's LLM did not learn the comparison in its budget."""
    from exgra_med.data.prepare.subsample import balance_yes_no

    if not 0.0 <= open_fraction <= 1.0:
        raise ValueError(f"open_fraction must be in [0, 1], got {open_fraction}")
    facts = facts_per_image(records)
    balanced = balance_yes_no(records, seed)
    open_ids = [i for i, r in enumerate(balanced) if str(r.get("answer_type", "")).upper() != "CLOSED"]
    drop_open = set(open_ids) - set(
        random.Random(f"{seed}-rationale-open").sample(open_ids, round(open_fraction * len(open_ids)))
    )
    out = []
    for i, record in enumerate(balanced):
        if i in drop_open:
            continue
        if str(record.get("answer_type", "")).upper() == "CLOSED":
            answer = rationale_answer(record_question(record), str(record["conversations"][1]["value"]),
                                      facts[record["image"]])
            if answer is not None:
                record = {**record, "conversations": [dict(t) for t in record["conversations"]]}
                record["conversations"][1]["value"] = answer
        out.append(record)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: `python -m examples.easy_vqa.rationale --in train.json --out train_rationale.json [--seed S]`."""
    from exgra_med.io import read_json, write_json_atomic

    p = argparse.ArgumentParser(
        prog="python -m examples.easy_vqa.rationale", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--in", dest="src", required=True, help="train.json of `exgra-med prepare easy-vqa`")
    p.add_argument("--out", required=True, help="where the fine-tuning records go (train_rationale.json)")
    p.add_argument("--seed", type=int, default=0, help="seed of the yes/no balancing and of the open questions kept")
    p.add_argument("--open-fraction", type=float, default=0.25, help="share of the open questions kept")
    args = p.parse_args(argv)
    if not 0.0 <= args.open_fraction <= 1.0:
        p.error("--open-fraction must be in [0, 1]")
    records = read_json(args.src)
    out = rationale_train_records(records, args.seed, args.open_fraction)
    write_json_atomic(args.out, out)
    rewritten = sum(parse_rationale(str(r["conversations"][1]["value"])) is not None for r in out)
    print(f"{len(out)} records ({rewritten} yes/no answers with their rationale) -> {args.out}")
    return 0


if __name__ == "__main__":
    import sys

    from exgra_med.cli import run_command

    raise SystemExit(run_command(main, sys.argv[1:], "python -m examples.easy_vqa.rationale"))
