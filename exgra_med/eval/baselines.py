"""Answer-prior baselines for a VQA test set, scored with the same metrics as the model.

- majority: every question gets the most frequent training answer of its answer type (OPEN / CLOSED).
- question prior: the most frequent training answer of the same question string (lower-cased, without
  `<image>`), falling back to the majority of its type for a question never seen in training.

Answers are counted lower-cased and stripped; ties go to the answer seen first. They show how much of a
score comes from answer statistics rather than from the image.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from exgra_med.data.records import question_text
from exgra_med.errors import HelpFormatter
from exgra_med.eval.metrics import load_predictions, reference_answer, score_vqa
from exgra_med.io import read_json

logger = logging.getLogger(__name__)

TABLE_COLUMNS = (("overall", "average"), ("closed", "closed_accuracy"), ("open", "recall"))


def _answer(record: Mapping[str, Any]) -> str:
    return reference_answer(record).strip().lower()


def question_key(record: Mapping[str, Any]) -> str:
    """The key the question prior is kept under: the question text lower-cased, without `<image>`."""
    return question_text(dict(record)).lower()


def _most_common(counts: Counter) -> str:
    return counts.most_common(1)[0][0]  # Counter keeps first-seen order among equal counts


def majority_answers(train: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """`{answer_type: most frequent training answer}` over the training records."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for record in train:
        counts[str(record.get("answer_type"))][_answer(record)] += 1
    if not counts:
        raise ValueError("majority baseline needs at least one training record")
    return {kind: _most_common(c) for kind, c in counts.items()}


def _fallback(majority: Mapping[str, str], record: Mapping[str, Any]) -> str:
    kind = str(record.get("answer_type"))
    if kind in majority:
        return majority[kind]
    # A type absent from training: the most frequent answer of any type is the best prior left.
    logger.warning("record %r: answer type %r not in the training set", record.get("id"), kind)
    return next(iter(majority.values()))


def majority_predictions(train: Sequence[Mapping], test: Sequence[Mapping]) -> dict[str, str]:
    """`{test id: majority answer of its type}`."""
    majority = majority_answers(train)
    return {str(r["id"]): _fallback(majority, r) for r in test}


def answer_counts_per_question(train: Sequence[Mapping]) -> dict[str, Counter]:
    """`{question_key: Counter of the question's training answers (lower-cased, stripped)}`."""
    per_question: dict[str, Counter] = defaultdict(Counter)
    for record in train:
        per_question[question_key(record)][_answer(record)] += 1
    return dict(per_question)


def question_prior_predictions(train: Sequence[Mapping], test: Sequence[Mapping]) -> dict[str, str]:
    """`{test id: most frequent training answer of the same question}` (majority of its type if unseen)."""
    majority = majority_answers(train)
    per_question = answer_counts_per_question(train)
    out = {}
    for record in test:
        counts = per_question.get(question_key(record))
        out[str(record["id"])] = _most_common(counts) if counts else _fallback(majority, record)
    return out


def summarize(scores: Mapping[str, float]) -> dict[str, float]:
    """The three numbers of the comparison table: open recall, closed accuracy and their mean."""
    return {
        "average": (scores["recall"] + scores["closed_accuracy"]) / 2,
        "closed_accuracy": scores["closed_accuracy"],
        "recall": scores["recall"],
    }


def compare(
    train: Sequence[Mapping], test: Sequence[Mapping], model_predictions: Mapping[Any, str] | None,
    candidates: Mapping[str, Sequence[Any]] | Sequence[Any],
) -> dict[str, dict[str, float]]:
    """`{row name: {average, closed_accuracy, recall}}` for the model (if given) and both baselines."""
    rows = {}
    if model_predictions is not None:
        rows["model"] = summarize(score_vqa(test, model_predictions, candidates))
    rows["majority answer"] = summarize(score_vqa(test, majority_predictions(train, test), candidates))
    rows["question prior"] = summarize(score_vqa(test, question_prior_predictions(train, test), candidates))
    return rows


def format_comparison(rows: Mapping[str, Mapping[str, float]]) -> str:
    """A markdown table: one row per system, columns overall (mean), closed (accuracy), open (recall)."""
    lines = ["| system | overall | closed | open |", "|---|---:|---:|---:|"]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[key]:.2f}" for _, key in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`exgra-med vqa-baselines --train train.json --test test.json --candidate candidate.json
    [--pred answers.jsonl]`."""
    parser = argparse.ArgumentParser(
        prog="exgra-med vqa-baselines", description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--train", required=True, help="training records (the answer statistics)")
    parser.add_argument("--test", required=True, help="test records (the questions scored)")
    parser.add_argument("--candidate", required=True, help='candidate.json ({"0": [answers]})')
    parser.add_argument("--pred", default=None, help="the model's answers file, shown in the first row")
    args = parser.parse_args(argv)
    train, test = read_json(args.train), read_json(args.test)
    predictions = load_predictions(args.pred) if args.pred else None
    rows = compare(train, test, predictions, read_json(args.candidate))
    n_closed = sum(r.get("answer_type") == "CLOSED" for r in test)
    print(
        f"{len(test)} test questions ({n_closed} closed, {len(test) - n_closed} open); "
        "overall = mean of closed accuracy and open recall, in %"
    )
    print(format_comparison(rows))
    return 0
