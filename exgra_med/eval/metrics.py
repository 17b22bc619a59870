"""VQA metrics with the reference definitions (`run_eval.py`, `eval_metrics/`, `train/train.py`).

Every answer is lower-cased and passed through `normalize_word` (see `glossary.py`); the token
metrics then normalise again, as the reference does. OPEN questions get exact match, token F1 /
precision / recall, nltk BLEU (default 4-gram weights, then 1-, 2- and 3-gram only) and open
accuracy (the candidate answer sharing most words with the prediction must equal the reference);
CLOSED questions get accuracy (normalised reference is a substring of the normalised prediction).
Scores are percentages. Where the reference divides by zero (no OPEN question) we report 0.0.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from exgra_med.errors import HelpFormatter, UserError
from exgra_med.eval.card import RunCard, answers_generation, file_entry
from exgra_med.eval.glossary import normalize_word
from exgra_med.io import read_json, read_jsonl, write_json_atomic

logger = logging.getLogger(__name__)

METRIC_KEYS = (
    "exact_match", "f1", "precision", "recall", "bleu", "bleu_1", "bleu_2", "bleu_3",
    "open_accuracy", "closed_accuracy",
)
_TABLE_ROWS = (
    ("exact match score", "exact_match"), ("f1 score", "f1"), ("precision", "precision"),
    ("recall", "recall"), ("bleu_score", "bleu"), ("bleu_score_1", "bleu_1"),
    ("bleu_score_2", "bleu_2"), ("bleu_score_3", "bleu_3"), ("open accuracy", "open_accuracy"),
    ("yes/no accuracy", "closed_accuracy"),
)
_BLEU_WEIGHTS = ((0.25, 0.25, 0.25, 0.25), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0))


def word_counts(text: str) -> Counter:
    """Unigram counts of lower-cased, whitespace-split `text` (the reference's `split_sentence(s, 1)`)."""
    return Counter(text.lower().split())


def exact_match(prediction: str, reference: str) -> float:
    """Distinct reference words found in the prediction, divided by the prediction's word count."""
    pred, ref = word_counts(normalize_word(prediction)), word_counts(normalize_word(reference))
    total = sum(pred.values())
    return sum(1 for w in ref if w in pred) / total if total else 0.0


def f1_precision_recall(prediction: str, reference: str) -> tuple[float, float, float]:
    """Token F1, precision, recall; a shared word counts with its prediction multiplicity (reference)."""
    pred, ref = word_counts(normalize_word(prediction)), word_counts(normalize_word(reference))
    if not pred or not ref:
        return 0.0, 0.0, 0.0
    tp = sum(c for w, c in pred.items() if w in ref)
    fp = sum(c for w, c in pred.items() if w not in ref)
    fn = sum(c for w, c in ref.items() if w not in pred)
    if tp == 0:
        return 0.0, 0.0, 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall), precision, recall


def bleu_scores(prediction: str, reference: str) -> tuple[float, float, float, float]:
    """nltk `sentence_bleu` without smoothing: default weights, then unigram, bigram, trigram only."""
    # lazy: nltk only for BLEU; `score` starts without it
    from nltk.translate.bleu_score import sentence_bleu

    hyp, refs = prediction.lower().split(), [reference.lower().split()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns on every zero n-gram count, as in the reference
        return tuple(float(sentence_bleu(refs, hyp, weights=w)) for w in _BLEU_WEIGHTS)  # type: ignore


CANDIDATE_SHAPE = 'expected {"0": [answers]} or a list of answers (strings or numbers)'
_JSON_NAMES = {dict: "object", list: "list", type(None): "null"}


def _shape(value: Any) -> str:
    """A short description of a JSON value's shape, for error messages."""
    if isinstance(value, list):
        kinds = sorted({_JSON_NAMES.get(type(v), type(v).__name__) for v in value})
        return f"a list of {' and '.join(k + 's' for k in kinds)}" if kinds else "an empty list"
    if isinstance(value, Mapping):
        return "an object"
    return f"a {type(value).__name__}"


def candidate_answers(candidates: Any) -> list[Any]:
    """The answers of a candidate file (`{"0": [...]}` or a plain list); a `ValueError` describes any other shape
    (an object without "0", a list of objects or lists, an empty list) rather than scoring it as 0."""
    answers = candidates
    if isinstance(candidates, Mapping):
        if "0" not in candidates:
            keys = ", ".join(repr(k) for k in list(candidates)[:5])
            raise ValueError(f"{CANDIDATE_SHAPE}, got an object without key '0' (keys: {keys or 'none'})")
        answers = candidates["0"]
        if not isinstance(answers, list):
            raise ValueError(f"{CANDIDATE_SHAPE}, got an object whose '0' is a {type(answers).__name__}")
    if (not isinstance(answers, list) or not answers
            or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in answers)):
        raise ValueError(f"{CANDIDATE_SHAPE}, got {_shape(answers)}")
    return answers


def normalize_candidates(candidates: Mapping[str, Sequence[Any]] | Sequence[Any]) -> list[str]:
    """The candidate list (`{"0": [...]}` or a plain list), numbers turned into text, normalised."""
    return [normalize_word(str(a)) for a in candidate_answers(candidates)]


def open_hit(prediction: str, reference: str, normalized_candidates: Sequence[str]) -> float:
    """1.0 when the candidate sharing the largest fraction of its words with the prediction (first
    one on ties) equals the reference, after normalisation; otherwise 0.0."""
    if not normalized_candidates:
        raise ValueError("open accuracy needs a non-empty candidate list")
    pred_words = word_counts(normalize_word(prediction))
    best, best_score = 0, -1.0
    for i, cand in enumerate(normalized_candidates):
        cand_words = word_counts(cand)
        score = sum(1 for w in pred_words if w in cand_words) / len(cand_words) if cand_words else 0.0
        if score > best_score:
            best, best_score = i, score
    return 1.0 if normalized_candidates[best] == normalize_word(reference) else 0.0


def closed_hit(prediction: str, reference: str) -> float:
    """1.0 when the reference is a substring of the prediction (both already normalised)."""
    return 1.0 if reference in prediction else 0.0


def reference_answer(record: Mapping[str, Any]) -> str:
    """The ground-truth answer of a VQA record: the second turn (`conversations`, or `conversatons`)."""
    turns = record.get("conversations", record.get("conversatons"))
    if not isinstance(turns, list) or len(turns) < 2 or "value" not in turns[1]:
        raise ValueError(f"record {record.get('id')!r}: needs 'conversations' with an answer turn")
    return str(turns[1]["value"])


def _answer_type(record: Mapping[str, Any]) -> str:
    kind = record.get("answer_type")
    if kind not in ("OPEN", "CLOSED"):
        raise ValueError(f"record {record.get('id')!r}: answer_type must be OPEN or CLOSED, got {kind!r}")
    return kind


def align_predictions(gt_records: Sequence[Mapping], predictions: Mapping[Any, str]) -> list[str]:
    """Prediction texts in ground-truth order; ids are compared as strings. Raises on duplicate,
    missing or extra ids, naming (up to 10 of) them."""
    by_id = {str(k): v for k, v in predictions.items()}
    gt_ids = [str(r.get("id")) for r in gt_records]
    dupes = [i for i, n in Counter(gt_ids).items() if n > 1]
    if dupes:
        raise ValueError(f"ground truth has duplicate ids: {dupes[:10]}")
    missing = [i for i in gt_ids if i not in by_id]
    extra = sorted(set(by_id) - set(gt_ids))
    if missing or extra:
        raise ValueError(
            f"predictions and ground truth do not match: {len(missing)} ids without a prediction "
            f"{missing[:10]}, {len(extra)} predictions for unknown ids {extra[:10]}"
        )
    return [str(by_id[i]) for i in gt_ids]


def _mean(values: Sequence[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else 0.0


def score_vqa(
    gt_records: Sequence[Mapping[str, Any]],
    predictions: Mapping[Any, str],
    candidates: Mapping[str, Sequence[Any]] | Sequence[Any],
) -> dict[str, float]:
    """All reference VQA metrics in percent (keys `METRIC_KEYS`, plus `num_open` / `num_closed`)."""
    texts = align_predictions(gt_records, predictions)
    cands: list[str] | None = None
    per: dict[str, list[float]] = {k: [] for k in METRIC_KEYS}
    for record, text in zip(gt_records, texts):
        gt = normalize_word(reference_answer(record).lower())
        pred = normalize_word(text.lower())
        if _answer_type(record) == "CLOSED":
            per["closed_accuracy"].append(closed_hit(pred, gt))
            continue
        if cands is None:
            cands = normalize_candidates(candidates)
        per["open_accuracy"].append(open_hit(pred, gt, cands))
        per["exact_match"].append(exact_match(pred, gt))
        values = (*f1_precision_recall(pred, gt), *bleu_scores(pred, gt))
        for key, value in zip(("f1", "precision", "recall", "bleu", "bleu_1", "bleu_2", "bleu_3"), values):
            per[key].append(value)
    scores = {k: _mean(v) for k, v in per.items()}
    scores["num_open"] = float(len(per["open_accuracy"]))
    scores["num_closed"] = float(len(per["closed_accuracy"]))
    return scores


def question_scores(
    gt_records: Sequence[Mapping[str, Any]], predictions: Mapping[Any, str],
) -> dict[str, dict[str, float]]:
    """Per question, the value the table's two headline numbers average: `{"closed": {id: hit 0/1}, "open": {id:
    recall 0-1}}` (their means x 100 are `score_vqa`'s closed_accuracy and recall), for paired resampling."""
    out: dict[str, dict[str, float]] = {"closed": {}, "open": {}}
    for record, text in zip(gt_records, align_predictions(gt_records, predictions)):
        gt = normalize_word(reference_answer(record).lower())
        pred = normalize_word(text.lower())
        if _answer_type(record) == "CLOSED":
            out["closed"][str(record["id"])] = closed_hit(pred, gt)
        else:
            out["open"][str(record["id"])] = f1_precision_recall(pred, gt)[2]
    return out


def vqa_train_metrics(gt_records: Sequence[Mapping[str, Any]], predictions: Mapping[Any, str]) -> dict:
    """The in-training metric: OPEN recall, CLOSED accuracy and their mean, in percent. A prediction
    is cut at the first `###` like the reference trainer does."""
    texts = align_predictions(gt_records, predictions)
    recalls, hits = [], []
    for record, text in zip(gt_records, texts):
        gt = normalize_word(reference_answer(record).strip().lower())
        pred = normalize_word(text.split("###", 1)[0].strip().lower())
        if _answer_type(record) == "OPEN":
            recalls.append(f1_precision_recall(pred, gt)[2])
        else:
            hits.append(closed_hit(pred, gt))
    open_recall, closed_accuracy = _mean(recalls), _mean(hits)
    return {
        "open_recall": open_recall,
        "closed_accuracy": closed_accuracy,
        "average": (open_recall + closed_accuracy) / 2,
    }


def load_predictions(path: str) -> dict[str, str]:
    """`{question_id: text}` from an answers JSON-lines file; a missing field or a repeated id names
    the line."""
    out: dict[str, str] = {}
    for lineno, row in enumerate(read_jsonl(path), 1):
        if not isinstance(row, dict) or "question_id" not in row or "text" not in row:
            raise ValueError(f"{path}: entry {lineno} needs 'question_id' and 'text'")
        key = str(row["question_id"])
        if key in out:
            raise ValueError(f"{path}: entry {lineno} repeats question_id {row['question_id']!r}")
        out[key] = str(row["text"])
    return out


def format_table(scores: Mapping[str, float]) -> str:
    """The reference's two-column table (`Metric`, `Performance`)."""
    rows = [(name, f"{scores[key]:g}") for name, key in _TABLE_ROWS]
    width = max(len("Metric"), *(len(r[0]) for r in rows))
    lines = [f"{'Metric'.ljust(width)}  Performance", f"{'-' * width}  {'-' * 11}"]
    lines += [f"{name.ljust(width)}  {value.rjust(11)}" for name, value in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`exgra-med score --gt test.json --pred answers.jsonl --candidate candidate.json [--json OUT]`; with `--json`,
    the reproducibility card goes beside OUT (`exgra_med.eval.card`)."""
    card = RunCard("score", argv)
    parser = argparse.ArgumentParser(
        prog="exgra-med score", description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--gt", required=True, help="VQA test json (list of records)")
    parser.add_argument("--pred", required=True, help="answers JSON-lines file")
    parser.add_argument("--candidate", required=True, help='candidate.json ({"0": [answers]})')
    parser.add_argument("--json", default=None,
                        help="write the scores here as JSON, and its reproducibility card beside it (scores.json -> "
                        "scores.card.json)")
    args = parser.parse_args(argv)
    gt = read_json(args.gt)
    if not isinstance(gt, list):
        raise ValueError(f"{args.gt}: expected a list of records")
    candidates = read_json(args.candidate)
    try:
        candidate_answers(candidates)
    except ValueError as e:
        raise UserError(f"{args.candidate}: {e}") from e
    try:
        scores = score_vqa(gt, load_predictions(args.pred), candidates)
    except ValueError as e:
        raise ValueError(f"{args.pred} vs {args.gt}: {e}") from e
    print(f"num_open {int(scores['num_open'])} || num_close {int(scores['num_closed'])}")
    print(format_table(scores))
    if args.json:
        write_json_atomic(args.json, scores)
        settings = {"gt": file_entry(args.gt), "pred": file_entry(args.pred), "candidate": file_entry(args.candidate),
                    "pred_generation": answers_generation(args.pred)}
        card.write(args.json, settings)
    return 0
