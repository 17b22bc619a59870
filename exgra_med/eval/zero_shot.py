"""Zero-shot multiple-choice classification on OmniMedVQA (`exgra-med zero-shot`).

Each record (`question`, `option_A`..`option_D`, `gt_answer`, `image_path`, `question_id`; see
`exgra_med.data.prepare.omnimedvqa`) is asked with the reference's prompt (the question, the list of
candidate answers, "Only return what you think is the correct answer ..."). The generated text is mapped
to the option with the highest `difflib` similarity ratio (the first one on ties; none when every ratio
is 0) and the item is correct when that option is `gt_answer`. Decoding is the reference's: sampling at
temperature 0.7 (seeded by `--seed`), at most 256 new tokens; `--temperature 0` decodes greedily.

Items whose image cannot be read or whose generation fails are listed in the results and scored both ways:
`accuracy` counts them wrong (over every item); `accuracy_reference` drops them from numerator and
denominator, as the reference does.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from exgra_med.constants import DEFAULT_IMAGE_TOKEN
from exgra_med.errors import HelpFormatter
from exgra_med.eval.generate import add_answer_arguments, answer_kwargs, answer_records, load_model, read_answer_lines
from exgra_med.io import read_json, write_json_atomic
from exgra_med.model.backend import Backend
from exgra_med.model.options import DecodingOptions, ModelOptions

logger = logging.getLogger(__name__)

OPTION_KEYS = ("option_A", "option_B", "option_C", "option_D")
INSTRUCTION = (
    " Only return what you think is the correct answer from the candidate answers, "
    "do not return any other irrelevant text!"
)


def options_of(record: Mapping[str, Any]) -> list[str]:
    """The record's candidate answers in A..D order (C and D only when present)."""
    return [record[k] for k in OPTION_KEYS if record.get(k) is not None]


def zero_shot_question(record: Mapping[str, Any]) -> str:
    """The reference's question text: question, "Here are N candidate answers:[...]", instruction."""
    options = options_of(record)
    return f"{record['question']}Here are {len(options)} candidate answers:{options!s}{INSTRUCTION}"


def similarity(a: str, b: str) -> float:
    """`difflib.SequenceMatcher(None, a, b).ratio()`, as the reference compares an option with the text."""
    return difflib.SequenceMatcher(None, a, b).ratio()


def map_to_option(text: str, options: Sequence[str]) -> int | None:
    """Index of the option most similar to `text` (first on ties); None when no option shares anything."""
    best, best_score = None, 0.0
    for i, option in enumerate(options):
        score = similarity(str(option), text)
        if score > best_score:
            best, best_score = i, score
    return best


def record_id(record: Mapping[str, Any], path: Path, index: int) -> str:
    """The record's `question_id`, or `{file stem}_{index:05d}` (what `prepare omnimedvqa` assigns)."""
    qid = record.get("question_id")
    return str(qid) if qid is not None else f"{path.stem}_{index:05d}"


def to_vqa_record(record: Mapping[str, Any], qid: str) -> dict:
    """The VQA-style record `generate_answers` reads: id, image, one human turn with `<image>`."""
    for key in ("question", "option_A", "option_B", "gt_answer", "image_path"):
        if key not in record:
            raise ValueError(f"question {qid!r}: missing field {key!r}")
    return {
        "id": qid,
        "image": record["image_path"],
        "conversations": [{"from": "human", "value": f"{zero_shot_question(record)}\n{DEFAULT_IMAGE_TOKEN}"}],
    }


def score_item(record: Mapping[str, Any], text: str | None) -> dict:
    """The prediction fields of one item: `model_pred`, `pred_option` (or None) and `is_correct`."""
    if text is None:
        return {"model_pred": None, "pred_option": None, "is_correct": False}
    options = options_of(record)
    index = map_to_option(text, options)
    option = None if index is None else options[index]
    return {
        "model_pred": text,
        "pred_option": option,
        "is_correct": option is not None and option == record["gt_answer"],
    }


def question_files(path: str | os.PathLike) -> tuple[Path, list[Path]]:
    """(root, json files): one file, or every *.json under a folder (sorted)."""
    path = Path(path)
    if path.is_file():
        return path.parent, [path]
    files = sorted(path.rglob("*.json"))
    if not files:
        raise FileNotFoundError(f"{path}: no .json question files")
    return path, files


def evaluate_file(backend: Backend, path: Path, out_file: Path, args: argparse.Namespace) -> dict:
    """Answer one question file (resuming `out_file`, JSON lines) and return its accuracy summary."""
    records = read_json(path)
    if not isinstance(records, list):
        raise TypeError(f"{path}: expected a JSON list of OmniMedVQA records")
    ids = [record_id(r, path, i) for i, r in enumerate(records)]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: question ids are not unique; run `exgra-med prepare omnimedvqa` first")
    # Later lines win: a rerun retries the items that failed before and appends their new line.
    done = {str(row["question_id"]): row for row in read_answer_lines(out_file, repair=True)}
    todo = [(qid, r) for qid, r in zip(ids, records) if qid not in done or done[qid].get("error")]
    out_file.parent.mkdir(parents=True, exist_ok=True)
    if todo:
        by_id = dict(todo)
        errors: dict[str, str] = {}
        with out_file.open("a", encoding="utf-8") as f:

            def write(lines: list[dict]) -> None:
                for line in lines:
                    done[str(line["question_id"])] = line
                f.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
                f.flush()

            def on_batch(batch: list[tuple[dict, str]]) -> None:
                write([{**by_id[r["id"]], "question_id": r["id"], **score_item(by_id[r["id"]], t)} for r, t in batch])

            answer_records(backend, [to_vqa_record(r, qid) for qid, r in todo], on_batch=on_batch, errors=errors,
                           **answer_kwargs(args))
            write(
                [
                    {**by_id[q], "question_id": q, **score_item(by_id[q], None), "error": msg}
                    for q, msg in errors.items()
                ]
            )
    return summarize_file([done[q] for q in ids if q in done], len(ids))


def _percent(correct: int, total: int) -> float:
    return 100.0 * correct / total if total else 0.0


def summarize_file(lines: Sequence[Mapping[str, Any]], total: int) -> dict:
    """Accuracy both ways and the failures: `accuracy` over all `total` items (failed and missing items count as
    wrong) and `accuracy_reference` over the answered items only (failures dropped, as the reference)."""
    correct = sum(bool(line.get("is_correct")) for line in lines)
    failed = [{"question_id": line["question_id"], "error": line["error"]} for line in lines if line.get("error")]
    answered = total - len(failed)
    return {"accuracy": _percent(correct, total), "accuracy_reference": _percent(correct, answered),
            "correct": correct, "total": total, "answered": answered, "failed": failed}


def build_parser() -> argparse.ArgumentParser:
    """The flags of `exgra-med zero-shot`."""
    parser = argparse.ArgumentParser(
        prog="exgra-med zero-shot", description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
    )
    add_answer_arguments(parser, max_new_tokens=256, temperature=0.7)  # the reference's sampling
    parser.add_argument("--question-file", required=True, help="an OmniMedVQA json file, or a folder of them")
    parser.add_argument("--out", required=True, type=Path, help="folder for predictions and results.json")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`exgra-med zero-shot --model DIR --question-file F|DIR --image-folder D --out DIR [--batch-size N]`."""
    args = build_parser().parse_args(argv)
    options, decoding = ModelOptions.from_args(args), DecodingOptions.from_args(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    root, files = question_files(args.question_file)
    backend = load_model(options, decoding.seed)
    per_file = {}
    for path in files:
        rel = path.relative_to(root).as_posix()
        per_file[rel] = evaluate_file(backend, path, args.out / "predictions" / f"{rel}l", args)
        logger.info(
            "%s: %.2f%% (%d/%d)", rel, per_file[rel]["accuracy"], per_file[rel]["correct"], per_file[rel]["total"]
        )
    total = sum(s["total"] for s in per_file.values())
    correct = sum(s["correct"] for s in per_file.values())
    answered = sum(s["answered"] for s in per_file.values())
    results = {
        "model": options.model,
        "decoding": asdict(decoding),
        "files": per_file,
        "overall": {
            "accuracy": _percent(correct, total),
            "accuracy_reference": _percent(correct, answered),
            "macro_accuracy": sum(s["accuracy"] for s in per_file.values()) / len(per_file),
            "macro_accuracy_reference": sum(s["accuracy_reference"] for s in per_file.values()) / len(per_file),
            "correct": correct,
            "total": total,
            "answered": answered,
            "failed": total - answered,
        },
    }
    write_json_atomic(args.out / "results.json", results)
    width = max(len(r) for r in per_file)
    print(f"{'file'.ljust(width)}  failed=wrong  failed dropped (reference)")
    for rel, s in per_file.items():
        print(f"{rel.ljust(width)}  {s['accuracy']:6.2f}%       {s['accuracy_reference']:6.2f}%  "
              f"({s['correct']}/{s['total']}, {len(s['failed'])} failed)")
    o = results["overall"]
    print(
        f"{'overall'.ljust(width)}  {o['accuracy']:6.2f}%       {o['accuracy_reference']:6.2f}%  "
        f"({correct}/{total}, {o['failed']} failed); macro {o['macro_accuracy']:.2f}% / "
        f"{o['macro_accuracy_reference']:.2f}%  -> {args.out / 'results.json'}"
    )
    return 0
