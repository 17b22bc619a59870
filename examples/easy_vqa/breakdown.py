"""A demo model's easy-VQA scores by question kind, under each image condition of a grounding audit.

The demo's table has two columns, closed (yes/no) and open; this splits them by what a question asks: the open
questions whose answer is a colour or a shape, and the yes/no questions that name a colour or a shape, asked for
presence ("is there a red shape?") or for absence ("is there not a red shape?"), each split by its true answer
(a model that answers "no" whatever it is asked scores 100% on the "no" rows and 0% on the "yes" ones, which an
accuracy per kind alone can hide behind easy-VQA's skewed answers). Scores are the in-training metric
of the table (closed accuracy by the reference's rule, open recall), per kind, for the real, blank and shuffled
images of `exgra-med grounding-audit --out` (or one answers file of `exgra-med generate-vqa`). For a model fine-tuned
on rationale answers ("red blue different absent yes", `python -m examples.easy_vqa.rationale`) it also counts
the yes/no answers whose comparison word agrees with the two words before it ("same" exactly when they are equal),
and checks the "seen" word against the image's truth (read off its questions), counting the answers that copy the
question's word where the image shows another: a consistent comparison alone cannot tell that copy from a reading.

    python -m examples.easy_vqa.breakdown --questions runs/demo/finetune/test_questions.json \\
        --audit runs/demo/finetune/grounding_audit.json
Results: README, demo section.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence

KIND_ORDER = ("open: colour", "open: shape", "open: other") + tuple(
    f"yes/no: {attribute}{negated}, truth {truth}"
    for attribute in ("colour", "shape") for negated in ("", ", negated") for truth in ("yes", "no")
)


def question_kind(record: Mapping) -> str:
    """The kind of an easy-VQA record: what an open question's answer is; what a yes/no question names, whether it
    asks for absence, and its true answer."""
    from examples.easy_vqa.rationale import record_question
    from exgra_med.data.prepare.easy_vqa import COLORS, NEGATION, SHAPES
    from exgra_med.eval.metrics import reference_answer

    if str(record.get("answer_type", "")).upper() == "OPEN":
        answer = reference_answer(record).strip().lower()
        return "open: colour" if answer in COLORS else "open: shape" if answer in SHAPES else "open: other"
    question = record_question(record)
    words = set(re.findall(r"[a-z]+", question))
    attribute = "shape" if words & set(SHAPES) else "colour"
    negated = ", negated" if NEGATION.search(question) else ""
    return f"yes/no: {attribute}{negated}, truth {reference_answer(record).strip().lower()}"


def breakdown(
    questions: Sequence[Mapping], answers: Mapping[str, Mapping[str, str]]
) -> dict[str, dict[str, tuple[int, float]]]:
    """{kind: {condition: (questions, score in %)}} for `answers` = {condition: {question id: answer text}}."""
    from exgra_med.eval.metrics import vqa_train_metrics

    by_kind: dict[str, list[Mapping]] = {}
    for record in questions:
        by_kind.setdefault(question_kind(record), []).append(record)
    table = {}
    for kind in [k for k in KIND_ORDER if k in by_kind] + sorted(set(by_kind) - set(KIND_ORDER)):
        records = by_kind[kind]
        ids = [str(r["id"]) for r in records]
        row = {}
        for condition, texts in answers.items():
            missing = [i for i in ids if i not in texts]
            if missing:
                raise ValueError(f"{condition}: no answer for question(s) {missing[:5]}")
            scores = vqa_train_metrics(records, {i: texts[i] for i in ids})
            row[condition] = (len(records), scores["open_recall" if kind.startswith("open") else "closed_accuracy"])
        table[kind] = row
    return table


def comparisons(
    questions: Sequence[Mapping], answers: Mapping[str, Mapping[str, str]]
) -> dict[str, tuple[int, int]]:
    """{condition: (yes/no answers whose comparison agrees with their asked and seen words, yes/no answers in the
    rationale form)}; conditions without such answers are left out."""
    from examples.easy_vqa.rationale import RATIONALE_WORDS, parse_rationale

    same_word, different_word = RATIONALE_WORDS[:2]
    closed_ids = [str(r["id"]) for r in questions if str(r.get("answer_type", "")).upper() == "CLOSED"]
    counts = {}
    for condition, texts in answers.items():
        steps = [s for s in (parse_rationale(texts.get(i, "")) for i in closed_ids) if s is not None]
        right = sum(s["comparison"] == (same_word if s["asked"] == s["seen"] else different_word) for s in steps)
        if steps:
            counts[condition] = (right, len(steps))
    return counts


def seen_words(
    questions: Sequence[Mapping], answers: Mapping[str, Mapping[str, str]]
) -> dict[str, tuple[int, int, int]]:
    """{condition: (yes/no answers whose seen word is the image's own colour or shape, answers whose seen word copies
    the asked word where that is not the image's, yes/no answers in the rationale form about an image whose truth
    the questions give)}; the comparison count cannot tell a seen word copied from the question from one read off
    the image. Conditions without such answers are left out."""
    from examples.easy_vqa.rationale import facts_per_image, parse_rationale
    from exgra_med.data.prepare.easy_vqa import SHAPES

    facts = facts_per_image([r for r in questions if r.get("image")])
    counts = {}
    for condition, texts in answers.items():
        right = copied = parsed = 0
        for record in questions:
            steps = parse_rationale(texts.get(str(record["id"]), ""))
            if str(record.get("answer_type", "")).upper() != "CLOSED" or steps is None:
                continue
            image = facts.get(record.get("image"))
            truth = None if image is None else image.shape if steps["asked"] in SHAPES else image.color
            if truth is None:
                continue
            parsed += 1
            right += steps["seen"] == truth
            copied += steps["seen"] == steps["asked"] != truth
        if parsed:
            counts[condition] = (right, copied, parsed)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    from exgra_med.eval.metrics import load_predictions
    from exgra_med.io import read_json

    p = argparse.ArgumentParser(prog="python -m examples.easy_vqa.breakdown", description=__doc__.splitlines()[0])
    p.add_argument("--questions", required=True, help="the VQA records answered (e.g. finetune/test_questions.json)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--audit", help="JSON of `exgra-med grounding-audit --out` (answers per image condition)")
    source.add_argument("--answers", help="answers JSONL of `exgra-med generate-vqa`")
    args = p.parse_args(argv)
    questions = read_json(args.questions)
    answers = read_json(args.audit)["answers"] if args.audit else {"answers": load_predictions(args.answers)}
    try:
        table = breakdown(questions, answers)
    except ValueError as e:
        p.exit(2, f"breakdown: {e}\n")
    conditions = list(answers)
    print("| question kind | questions | " + " | ".join(conditions) + " |")
    print("|---|---:|" + "---:|" * len(conditions))
    for kind, row in table.items():
        scores = " | ".join(f"{row[c][1]:.1f}" for c in conditions)
        print(f"| {kind} | {next(iter(row.values()))[0]} | {scores} |")
    for condition, (right, copied, parsed) in seen_words(questions, answers).items():
        print(f"{condition}: the seen word is the image's own colour or shape in {right} of the {parsed} yes/no "
              f"answers written as a rationale; it copies the question's word instead in {copied}")
    for condition, (right, parsed) in comparisons(questions, answers).items():
        print(f"{condition}: the comparison agrees with the asked and seen words in {right} of the {parsed} yes/no "
              "answers written as a rationale")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
