"""Medical visual chatbot review: an LLM judge scores model answers against reference answers.

As in LLaVA-Med's review, the judge sees the figure caption and mention (when given), the question,
the reference answer as Assistant 1 and the model's answer as Assistant 2, rates helpfulness,
relevance, accuracy and level of detail, and puts the two overall scores (1-10) on its first line.
Per question type, per domain and overall we report both scores and the relative score
`mean(model) / mean(reference) * 100` (LLaVA's `summarize_gpt_review.py`) and, as LLaVA-Med's
`eval_multimodal_chat_gpt_score.py` prints it, the mean of per-question ratios x 100.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from exgra_med.constants import DEFAULT_IMAGE_TOKEN
from exgra_med.errors import HelpFormatter
from exgra_med.io import read_jsonl, write_json_atomic, write_jsonl_atomic
from exgra_med.llm_client import InvalidReply, ItemContext, RunResult, failures_path_for, progress_path_for
from exgra_med.llm_client.chat import chat_request
from exgra_med.llm_client.job_cli import JobPlan, run_job_command

logger = logging.getLogger(__name__)

COMMAND = "chatbot-review"
REVIEWS_FILE = "reviews.jsonl"
DEFAULT_JUDGE = "openai/gpt-4o"
JUDGE_SYSTEM = "You are a careful, impartial assistant who judges the quality of answers."
JUDGE_INSTRUCTION = (
    "Please evaluate the responses of the two AI assistants to the user question above. The user asked "
    "the question while looking at an image; you cannot see it, but its caption and the text that "
    "mentions it are given as context when available.\nRate the helpfulness, relevance, accuracy and "
    "level of detail of each response, and give each assistant one overall score from 1 to 10, where a "
    "higher score means a better response.\nOn the first line write only the two scores, for Assistant 1 "
    "and Assistant 2 in that order, separated by a space. From the second line on, explain your "
    "judgement; do not let the order in which the responses appear influence it."
)
DOMAINS = ("chest_xray", "mri", "histology", "gross", "ct_scan")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _by_question_id(rows: list[dict], path: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "question_id" not in row:
            raise ValueError(f"{path}: line {i + 1} has no field 'question_id'")
        key = str(row["question_id"])
        if key in out:
            raise ValueError(f"{path}: question_id {key!r} appears more than once")
        out[key] = row
    return out


def reference_text(row: dict, path: Path) -> str:
    """The reference answer of a row: `gpt4_answer` (LLaVA-Med question file), else `answer`, else `text`."""
    for field in ("gpt4_answer", "answer", "text"):
        if isinstance(row.get(field), str) and row[field].strip():
            return row[field].strip()
    raise ValueError(
        f"{path}: question {row.get('question_id')}: no reference answer (gpt4_answer/answer/text)"
    )


def domain_of(question: dict) -> str | None:
    """LLaVA-Med's domain: the first true flag of the `domain` dict, or the `domain` string."""
    domain = question.get("domain")
    if isinstance(domain, dict):
        return next((d for d in DOMAINS if domain.get(d)), next((k for k, v in domain.items() if v), None))
    return domain if isinstance(domain, str) and domain else None


def build_samples(question_file: Path, answers_file: Path, reference_file: Path) -> dict[str, dict]:
    """Join questions, model answers and reference answers by question_id (every question needs both)."""
    questions = _by_question_id(read_jsonl(question_file), question_file)
    answers = _by_question_id(read_jsonl(answers_file), answers_file)
    references = _by_question_id(read_jsonl(reference_file), reference_file)
    samples = {}
    for qid, q in questions.items():
        if qid not in answers:
            raise ValueError(f"{answers_file}: no answer for question_id {qid}")
        if qid not in references:
            raise ValueError(f"{reference_file}: no reference answer for question_id {qid}")
        if not isinstance(q.get("text"), str):
            raise ValueError(f"{question_file}: question {qid}: field 'text' must be a string")
        answer = answers[qid].get("text")
        if not isinstance(answer, str):
            raise ValueError(f"{answers_file}: question {qid}: field 'text' must be a string")
        samples[qid] = {
            "question_id": q["question_id"],
            "category": str(q.get("type", q.get("category", "all"))),
            "domain": domain_of(q),
            "question": q["text"].replace(DEFAULT_IMAGE_TOKEN, "").strip(),
            "caption": q.get("fig_caption") or "",
            "fig_label": q.get("fig_label") or "",
            "mention": q.get("in_text_mention") or "",
            "reference": reference_text(references[qid], reference_file),
            "answer": answer.strip(),
        }
    return samples


def judge_messages(sample: dict) -> list[dict[str, str]]:
    """The judge's system and user messages for one sample."""
    parts = []
    if sample["caption"] or sample["mention"]:
        label = f"{sample['fig_label']}: " if sample["fig_label"] else ""
        caption, mention = sample["caption"], sample["mention"]
        parts.append(f"[Context]\nFigure caption:\n{label}{caption}\n\nFigure context:\n\t- {mention}")
    parts.append(f"[Question]\n{sample['question']}")
    for i, text in ((1, sample["reference"]), (2, sample["answer"])):
        parts.append(f"[Assistant {i}]\n{text}\n\n[End of Assistant {i}]")
    parts.append(f"[System]\n{JUDGE_INSTRUCTION}")
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": "\n\n".join(parts) + "\n\n"},
    ]


def parse_scores(content: str) -> list[float]:
    """The two scores on the first non-empty line; `InvalidReply` unless exactly two numbers in [0, 10]."""
    line = next((ln for ln in content.strip().splitlines() if ln.strip()), "")
    numbers = [float(x) for x in _NUMBER.findall(line)]
    if len(numbers) != 2 or not all(0 <= x <= 10 for x in numbers):
        raise InvalidReply(f"first line must hold two scores in [0, 10], got {line[:80]!r}")
    return numbers


def summarize(reviews: Sequence[dict]) -> dict[str, dict[str, Any]]:
    """Scores per category, per domain and 'all': means, relative score and mean per-item ratio.

    A relative score is None when the reference scores are all 0; items scored 0 for the reference
    are left out of the per-item ratio.
    """
    groups: dict[str, list[list[float]]] = defaultdict(list)
    for r in reviews:
        for name in ("all", r["category"], r["domain"]):
            if name:
                groups[name].append(r["tuple"])
    summary = {}
    for name, pairs in groups.items():
        ref = sum(p[0] for p in pairs) / len(pairs)
        model = sum(p[1] for p in pairs) / len(pairs)
        ratios = [p[1] / p[0] for p in pairs if p[0] > 0]
        summary[name] = {
            "reference_score": ref,
            "model_score": model,
            "relative_score": model / ref * 100 if ref > 0 else None,
            "item_relative_score": sum(ratios) / len(ratios) * 100 if ratios else None,
            "count": len(pairs),
        }
    return summary


def format_summary(summary: dict[str, dict[str, Any]]) -> str:
    """A plain-text table, 'all' first."""
    names = ["all"] + sorted(n for n in summary if n != "all")
    lines = [f"{'group':<24} {'n':>5} {'reference':>9} {'model':>7} {'relative':>8} {'item rel.':>9}"]
    for n in names:
        s = summary.get(n)
        if s:
            rel, item = (
                f"{x:.1f}" if x is not None else "n/a"
                for x in (s["relative_score"], s["item_relative_score"])
            )
            lines.append(
                f"{n:<24} {s['count']:>5} {s['reference_score']:>9.2f} {s['model_score']:>7.2f} "
                f"{rel:>8} {item:>9}"
            )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    """The command's own flags; `run_job_command` adds the API ones."""
    p = argparse.ArgumentParser(
        prog=f"exgra-med {COMMAND}", description=__doc__.split("\n")[0],
        formatter_class=HelpFormatter,
    )
    p.add_argument("--question-file", required=True, help="questions (JSON lines, LLaVA-Med qa50 format)")
    p.add_argument("--answers", required=True, help="model answers (JSON lines: question_id, text)")
    p.add_argument(
        "--reference",
        default=None,
        help="reference answers (JSONL: question_id + gpt4_answer/answer/text; default: --question-file)",
    )
    p.add_argument("--out", required=True, help="folder for reviews.jsonl, summary.json and the progress log")
    p.add_argument("--judge-model", default=DEFAULT_JUDGE, help="model id of the LLM judge")
    p.add_argument("--resume", action="store_true", help="continue the reviews already in --out")
    p.add_argument("--keep-failed", action="store_true", help="on resume, do not retry failed questions")
    p.add_argument("--temperature", type=float, default=0.2, help="sampling temperature of the judge")
    p.add_argument("--max-tokens", type=int, default=1024, help="longest review the judge may write, in tokens")
    return p


def _plan(args: argparse.Namespace) -> JobPlan[dict]:
    """Read and join the inputs and describe the run; bad inputs raise (reported by `run_job_command`)."""
    question_file = Path(args.question_file)
    out = Path(args.out)
    samples = build_samples(question_file, Path(args.answers), Path(args.reference or question_file))

    def work(sample: dict, ctx: ItemContext, client: Any) -> dict[str, Any]:
        kwargs = {"temperature": args.temperature, "max_tokens": args.max_tokens}
        content_and_scores = chat_request(
            ctx,
            client,
            args.judge_model,
            judge_messages(sample),
            lambda text: (text, parse_scores(text)),
            **kwargs,
        )
        return {"content": content_and_scores[0], "tuple": content_and_scores[1]}

    return JobPlan(
        jobs=samples,
        progress_path=progress_path_for(out / REVIEWS_FILE),
        work=work,
        finish=lambda result: _write_outputs(samples, out, args.judge_model, result),
        resume=args.resume,
        retry_failed=not args.keep_failed,
        rerun_hint="finished reviews are kept, rerun with --resume",
    )


def _write_outputs(samples: dict[str, dict], out: Path, judge_model: str, result: RunResult) -> int:
    """Write the reviews, failures and summary, print the table; 0 when every question was reviewed."""
    reviews_path = out / REVIEWS_FILE
    reviews, failures = [], []
    for qid, sample in samples.items():
        entry = result.entries.get(qid)
        if entry is None:
            continue
        if entry["ok"]:
            reviews.append(
                {
                    "question_id": sample["question_id"],
                    "category": sample["category"],
                    "domain": sample["domain"],
                    "judge_model": judge_model,
                    **entry["value"],
                }
            )
        else:
            failures.append(
                {"question_id": sample["question_id"], "error": entry["error"], "attempts": entry["attempts"]}
            )
    summary = summarize(reviews)
    write_jsonl_atomic(reviews_path, reviews)
    write_jsonl_atomic(failures_path_for(reviews_path), failures)
    write_json_atomic(
        out / "summary.json",
        {
            "judge_model": judge_model,
            "reviewed": len(reviews),
            "failed": len(failures),
            "scores": summary,
        },
    )
    print(format_summary(summary) if reviews else f"{COMMAND}: no reviews")
    print(
        f"{COMMAND}: {len(reviews)}/{len(samples)} reviewed -> {reviews_path}; {len(failures)} failed; "
        f"{result.stats.retried} retries, {result.stats.tokens} tokens"
    )
    return 0 if len(reviews) == len(samples) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """`exgra-med chatbot-review`: 0 when every question was reviewed, 1 when some failed, 2 on bad usage."""
    return run_job_command(COMMAND, _parser(), argv, _plan, default_concurrency=4)
