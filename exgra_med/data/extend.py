"""Extended captions (METHOD section 6): an LLM rewrites every gpt answer into a richer `revision`.

Each (instruction, answer) pair of an instruct record is one request. The reply must be a JSON object
with a non-empty `revision` no longer than the limit; the revision replaces the answer. The output is
the input records with their gpt values replaced, ready for `exgra-med merge-extended`. Requests run
through `exgra_med.llm_client.run_jobs`, so a killed run resumes without paying twice (`--resume_from`).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from exgra_med.constants import GPT, HUMAN
from exgra_med.errors import HelpFormatter
from exgra_med.io import read_json, read_jsonl, write_json_atomic, write_jsonl_atomic
from exgra_med.llm_client import (
    InvalidReply,
    ItemContext,
    RunResult,
    failures_path_for,
    load_progress,
    progress_path_for,
)
from exgra_med.llm_client.chat import chat_request, parse_json_object
from exgra_med.llm_client.job_cli import JobPlan, run_job_command

logger = logging.getLogger(__name__)

COMMAND = "extend-captions"
DEFAULT_MODEL = "openai/gpt-4o-mini"


def default_system_prompt_path() -> Path:
    """The system prompt shipped with the package (`exgra_med/prompts/extend_caption.txt`)."""
    return Path(str(resources.files("exgra_med").joinpath("prompts", "extend_caption.txt")))


def conversation_of(record: dict, source: str | Path) -> list[dict]:
    """The validated turns of `record` (also under the misspelled key `conversatons`)."""
    rid = record.get("id", "?")
    conv = record.get("conversations", record.get("conversatons"))
    if not isinstance(conv, list) or not conv:
        raise ValueError(f"{source}: record {rid}: field 'conversations' must be a non-empty list")
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or turn.get("from") not in (HUMAN, GPT):
            raise ValueError(f"{source}: record {rid}: conversations[{i}].from must be 'human' or 'gpt'")
        if not isinstance(turn.get("value"), str):
            raise ValueError(f"{source}: record {rid}: conversations[{i}].value must be a string")
    return conv


def load_instruction_records(path: str | Path) -> list[dict]:
    """Read instruct records (a JSON list, or JSON lines for `.jsonl`) and check ids and turns."""
    path = Path(path)
    records = read_jsonl(path) if path.suffix == ".jsonl" else read_json(path)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a list of records, got {type(records).__name__}")
    seen: set[str] = set()
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "id" not in record:
            raise ValueError(f"{path}: record #{i} has no field 'id'")
        key = str(record["id"])
        if key in seen:
            raise ValueError(f"{path}: record id {key!r} appears more than once")
        seen.add(key)
        conversation_of(record, path)
    return records


@dataclass(frozen=True)
class TurnJob:
    """One request: the gpt turn `turn` of record `record_id`, with the question that preceded it."""

    record_id: Any
    turn: int
    instruction: str
    answer: str


def turn_key(record_id: Any, turn: int) -> str:
    """Progress-log key of one gpt turn."""
    return f"{record_id}#{turn}"


def build_jobs(records: Sequence[dict], source: str | Path = "<records>") -> dict[str, TurnJob]:
    """One job per gpt turn, keyed by `turn_key`, in input order."""
    jobs: dict[str, TurnJob] = {}
    for record in records:
        instruction = ""
        for i, turn in enumerate(conversation_of(record, source)):
            if turn["from"] == "human":
                instruction = turn["value"].strip()  # with its <image> text, as the reference sends it
            else:
                jobs[turn_key(record["id"], i)] = TurnJob(record["id"], i, instruction, turn["value"].strip())
    return jobs


def user_message(job: TurnJob) -> str:
    """The user turn sent with the system prompt: the pair as one JSON object, as the reference sends it."""
    return json.dumps({"instruction": job.instruction, "answer": job.answer}, ensure_ascii=False)


def revision_limit(answer: str, ratio: float, min_chars: int) -> int:
    """Longest accepted revision in characters: `ratio` x the answer, but at least `min_chars`."""
    return max(int(ratio * len(answer)), min_chars)


def parse_revision(content: str, max_chars: int) -> dict:
    """`{"revision", "explanation"}` from a reply; `InvalidReply` if missing, empty or too long."""
    reply = parse_json_object(content)
    revision = reply.get("revision")
    if not isinstance(revision, str) or not revision.strip():
        raise InvalidReply("reply has no non-empty string 'revision'")
    revision = " ".join(revision.split())  # the prompt asks for one paragraph; drop stray line breaks
    if len(revision) > max_chars:
        raise InvalidReply(f"revision has {len(revision)} characters, limit {max_chars}")
    explanation = reply.get("explanation")  # the prompt asks for one comment per aspect; older prompts: a string
    if isinstance(explanation, dict):
        explanation = {str(k): str(v) for k, v in explanation.items()}
    elif not isinstance(explanation, str):
        explanation = ""
    return {"revision": revision, "explanation": explanation}


def entries_from_output(path: Path, jobs: dict[str, TurnJob]) -> list[dict]:
    """Progress entries for the turns of records already in a finished output file."""
    entries = []
    for record in load_instruction_records(path):
        for i, turn in enumerate(conversation_of(record, path)):
            key = turn_key(record["id"], i)
            if turn["from"] == "gpt" and key in jobs:
                value = {"revision": turn["value"], "explanation": ""}
                entries.append({"key": key, "ok": True, "value": value, "attempts": 0, "tokens": 0})
    return entries


def assemble(records: Sequence[dict], entries: dict[str, dict]) -> tuple[list[dict], list[dict], int]:
    """(extended records, failures, unfinished count): a record is extended when all its turns are done."""
    extended, failures, unfinished = [], [], 0
    for record in records:
        conv = record.get("conversations", record.get("conversatons"))
        new_conv, errors, missing = [], [], False
        for i, turn in enumerate(conv):
            entry = entries.get(turn_key(record["id"], i)) if turn["from"] == "gpt" else None
            if turn["from"] == "gpt" and entry is None:
                missing = True
            elif entry is not None and not entry["ok"]:
                errors.append({"turn": i, "error": entry["error"], "attempts": entry["attempts"]})
            new_conv.append(
                {**turn, "value": entry["value"]["revision"]} if entry and entry["ok"] else dict(turn)
            )
        if errors:
            failures.append({"id": record["id"], "errors": errors})
        elif missing:
            unfinished += 1
        else:
            out = {k: v for k, v in record.items() if k != "conversatons"}
            out["conversations"] = new_conv
            extended.append(out)
    return extended, failures, unfinished


def _resume_seeds(previous: Path, output: Path, jobs: dict[str, TurnJob]) -> list[dict]:
    """Finished entries of the run that wrote `previous`: its records, and its progress log (if not ours)."""
    prev_progress = progress_path_for(previous)
    if not previous.exists() and not prev_progress.exists():
        logger.warning("--resume_from %s: no output or progress there yet; starting afresh", previous)
    seeds = entries_from_output(previous, jobs) if previous.exists() else []
    if prev_progress.exists() and prev_progress.resolve() != progress_path_for(output).resolve():
        seeds += [e for e in load_progress(prev_progress).values() if e["key"] in jobs]
    return seeds


def _parser() -> argparse.ArgumentParser:
    """The command's own flags; `run_job_command` adds the API ones."""
    p = argparse.ArgumentParser(
        prog=f"exgra-med {COMMAND}", description=__doc__.split("\n")[0],
        formatter_class=HelpFormatter,
    )
    p.add_argument("--original_instruction_fpath", required=True, help="instruct records (.json or .jsonl)")
    p.add_argument("--system_prompt_fpath", default=None, help="system prompt (default: the shipped one)")
    p.add_argument("--model_name", default=DEFAULT_MODEL, help="model id at the endpoint")
    p.add_argument("--output", default=None, help="output JSON (default: <input stem>.extended.json)")
    p.add_argument(
        "--resume_from",
        default=None,
        help="an earlier run's --output; its progress log and finished records are reused",
    )
    p.add_argument("--keep-failed", action="store_true", help="on resume, do not retry items that failed")
    p.add_argument(
        "--max-length-ratio", type=float, default=2.0, help="revision length limit / answer length"
    )
    p.add_argument("--min-length-limit", type=int, default=200, help="length limit floor for short answers")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--max-tokens", type=int, default=None, help="completion token cap per request")
    return p


def _plan(args: argparse.Namespace) -> JobPlan[TurnJob]:
    """Read and check the inputs and describe the run; bad inputs raise (reported by `run_job_command`)."""
    source = Path(args.original_instruction_fpath)
    output = Path(args.output) if args.output else source.with_name(source.stem + ".extended.json")
    records = load_instruction_records(source)
    jobs = build_jobs(records, source)
    prompt_path = Path(args.system_prompt_fpath) if args.system_prompt_fpath else default_system_prompt_path()
    system_prompt = prompt_path.read_text(encoding="utf-8").strip()
    seeds = _resume_seeds(Path(args.resume_from), output, jobs) if args.resume_from else []
    if args.resume_from is None and output.exists():
        raise FileExistsError(f"{output} exists; pass --resume_from {output} to continue it")
    create_kwargs: dict[str, Any] = {}
    if args.temperature is not None:
        create_kwargs["temperature"] = args.temperature
    if args.max_tokens is not None:
        create_kwargs["max_tokens"] = args.max_tokens

    def work(job: TurnJob, ctx: ItemContext, client: Any) -> dict:
        messages = [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": user_message(job)},
        ]
        limit = revision_limit(job.answer, args.max_length_ratio, args.min_length_limit)
        return chat_request(
            ctx, client, args.model_name, messages, lambda text: parse_revision(text, limit), **create_kwargs
        )

    return JobPlan(
        jobs=jobs,
        progress_path=progress_path_for(output),
        work=work,
        finish=lambda result: _write_outputs(records, output, result),
        resume=args.resume_from is not None,
        retry_failed=not args.keep_failed,
        rerun_hint=f"finished items are kept, rerun with --resume_from {output}",
        seed_entries=seeds,
    )


def _write_outputs(records: Sequence[dict], output: Path, result: RunResult) -> int:
    """Write the extended records and the failures, print the counts; 0 when every record was extended."""
    extended, failures, unfinished = assemble(records, result.entries)
    write_json_atomic(output, extended)
    write_jsonl_atomic(failures_path_for(output), failures)
    s = result.stats
    print(
        f"{COMMAND}: {len(extended)}/{len(records)} records extended -> {output}; "
        f"{len(failures)} failed -> {failures_path_for(output)}; {unfinished} unfinished; "
        f"{s.done} requests done now, {s.skipped} earlier, {s.retried} retries, {s.tokens} tokens"
    )
    return 0 if not failures and not unfinished else 1


def main(argv: Sequence[str] | None = None) -> int:
    """`exgra-med extend-captions`: 0 when every record was extended, 1 when some failed, 2 on bad usage."""
    return run_job_command(COMMAND, _parser(), argv, _plan)
