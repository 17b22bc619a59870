"""Answer generation spread over GPUs (`exgra-med generate-vqa-multi`), then one merged answers file.

Answers files: `read_answer_lines` (tolerates a torn last line) and `get_chunk` live here too.

The question file is split into K chunks (the reference's `--num-chunks/--chunk-idx`); chunk i runs as
`exgra-med generate-vqa --chunk-idx i` in its own process with `CUDA_VISIBLE_DEVICES` set to one GPU
(GPUs are assigned round robin; a GPU runs its chunks one after the other). Without GPUs the K
processes run side by side on the CPU, sharing its cores. Chunk files live in `<answers>.chunks/` and
are resumable, so a rerun only generates what is missing. The merge writes one line per question,
in question-file order, and fails if any question has no answer or more than one.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from exgra_med.errors import HelpFormatter, UserError
from exgra_med.io import read_json, write_jsonl_atomic

logger = logging.getLogger(__name__)


# --- answers files and chunks ---------------------------------------------------------------------
def get_chunk(records: Sequence[Any], num_chunks: int, chunk_idx: int) -> list:
    """Chunk `chunk_idx` of `num_chunks` contiguous chunks of ceil(N / num_chunks) records (the reference's split)."""
    if num_chunks < 1 or not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"need 0 <= chunk_idx < num_chunks, got chunk_idx={chunk_idx} num_chunks={num_chunks}")
    size = max(1, math.ceil(len(records) / num_chunks))
    return list(records[chunk_idx * size : (chunk_idx + 1) * size])


# The first key of every line `answer_line` writes: a torn line that starts otherwise is not ours to cut.
ANSWER_LINE_START = b'{"question_id"'


class NotAnswersFileError(UserError):
    """A file given as an answers file does not hold answer lines: it is never truncated, appended to or replaced."""


def read_answer_lines(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """The complete lines of an answers file. A torn last line (no final newline, or invalid JSON, from an interrupted
    run) is ignored, and cut off the file with `repair=True`. A file that is not an answers file (a line that is not a
    JSON object with a `question_id`, or a torn line that is not the start of one, such as a JSON document written
    without a final newline) raises `NotAnswersFileError` and is left as it is."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")  # the last piece is b"" when the file ends with a newline
    rows, good_end, pos = [], 0, 0
    for lineno, line in enumerate(lines, 1):
        is_last = lineno >= len(lines) - (0 if lines[-1] else 1)
        pos += len(line) + 1
        if not line.strip():
            good_end = min(pos, len(data))
            continue
        try:
            row = json.loads(line) if lineno < len(lines) else None  # no newline after it: torn
        except json.JSONDecodeError as e:
            if not is_last:
                raise NotAnswersFileError(f"{path}: line {lineno} is not valid JSON ({e.msg}); not an answers file, "
                                          "left unchanged") from e
            row = None
        if row is None:
            if not line.lstrip().startswith(ANSWER_LINE_START):
                raise NotAnswersFileError(f"{path}: line {lineno} is not an answer line; not an answers file, left "
                                          "unchanged")
            logger.warning("%s: dropping the torn last line %d (interrupted run)", path, lineno)
            if repair:
                with path.open("r+b") as f:
                    f.truncate(good_end)
            break
        if not isinstance(row, dict) or "question_id" not in row:
            raise NotAnswersFileError(f"{path}: line {lineno} has no 'question_id'; not an answers file, left "
                                      "unchanged")
        rows.append(row)
        good_end = min(pos, len(data))
    return rows


def check_answers_file(answers_file: str | os.PathLike, inputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse an answers file that is one of the command's inputs (`{flag: path}`), before anything is read or
    written: resuming would cut and append to it."""
    out = Path(answers_file)
    for flag, path in inputs.items():
        if path is None or not Path(path).exists() or not out.exists():
            continue
        if os.path.samefile(out, path):  # the same file, whatever the spelling (links, relative paths)
            raise UserError(f"--answers-file {answers_file} is the {flag} file; write the answers to another file")


def chunk_path(answers_file: str | os.PathLike, num_chunks: int, chunk_idx: int) -> Path:
    """Where chunk `chunk_idx` of `num_chunks` keeps its answers."""
    answers_file = Path(answers_file)
    return answers_file.parent / f"{answers_file.name}.chunks" / f"{num_chunks}_{chunk_idx}.jsonl"


def merge_answers(
    question_file: str | os.PathLike, chunk_files: Sequence[str | os.PathLike], out: str | os.PathLike
) -> int:
    """Write the answers of `chunk_files` to `out` in question order; returns the number of lines.

    Raises when a question has no answer, when a question id is answered twice, or when an answer
    belongs to no question (naming up to 10 ids).
    """
    questions = read_json(question_file)
    if not isinstance(questions, list) or not all(isinstance(q, dict) and "id" in q for q in questions):
        raise ValueError(f"{question_file}: expected a JSON list of records with an 'id'")
    by_id: dict[str, dict] = {}
    dupes, unknown = [], []
    known = {str(q["id"]) for q in questions}
    for path in chunk_files:
        for row in read_answer_lines(path):
            key = str(row["question_id"])
            if key not in known:
                unknown.append(key)
            elif key in by_id:
                dupes.append(key)
            else:
                by_id[key] = row
    missing = [str(q["id"]) for q in questions if str(q["id"]) not in by_id]
    if dupes or unknown or missing:
        raise ValueError(
            f"cannot merge answers for {question_file}: {len(missing)} questions without an answer {missing[:10]}, "
            f"{len(dupes)} answered twice {dupes[:10]}, {len(unknown)} answers to unknown ids {unknown[:10]}"
        )
    settings = {json.dumps((row.get("metadata") or {}).get("generation"), sort_keys=True) for row in by_id.values()}
    if len(settings) > 1:
        raise ValueError(
            f"cannot merge answers for {question_file}: the chunks were generated with {len(settings)} different "
            "models or settings (metadata.generation); rerun with --restart"
        )
    write_jsonl_atomic(out, [by_id[str(q["id"])] for q in questions])
    return len(questions)


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else every device torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    # lazy: the launcher counts GPUs with torch only when --gpus is not given
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def chunk_commands(
    num_chunks: int, answers_file: str | os.PathLike, generate_args: Sequence[str], gpus: Sequence[str]
) -> list[tuple[dict[str, str], list[list[str]]]]:
    """One (extra environment, commands run one after the other) per worker: a GPU, or a chunk on CPU."""

    def command(i: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "exgra_med.cli",
            "generate-vqa",
            *generate_args,
            "--quiet",
            "--num-chunks",
            str(num_chunks),
            "--chunk-idx",
            str(i),
            "--answers-file",
            str(chunk_path(answers_file, num_chunks, i)),
        ]

    if not gpus:
        threads = str(max(1, (os.cpu_count() or 1) // num_chunks))
        env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads}
        return [(env, [command(i)]) for i in range(num_chunks)]
    workers = []
    for g, gpu in enumerate(gpus[:num_chunks]):
        workers.append(({"CUDA_VISIBLE_DEVICES": gpu}, [command(i) for i in range(g, num_chunks, len(gpus))]))
    return workers


def run_chunks(
    num_chunks: int, answers_file: str | os.PathLike, generate_args: Sequence[str], gpus: Sequence[str] | None = None
) -> None:
    """Run every chunk (in parallel over the workers); raises naming the chunks that failed."""
    gpus = visible_gpus() if gpus is None else list(gpus)
    workers = chunk_commands(num_chunks, answers_file, generate_args, gpus)
    logger.info("%d chunks on %s", num_chunks, f"GPUs {','.join(gpus)}" if gpus else f"CPU ({len(workers)} processes)")
    scripts = []
    for env, cmds in workers:
        # A worker runs its chunks in sequence; `&&` stops at the first failure.
        script = " && ".join(shlex.join(c) for c in cmds)
        scripts.append(subprocess.Popen(["/bin/sh", "-c", script], env={**os.environ, **env}))
    failed = [i for i, p in enumerate(scripts) if p.wait() != 0]
    if failed:
        raise RuntimeError(f"answer generation failed in worker(s) {failed}; rerun the same command to resume")


def main(argv: Sequence[str] | None = None) -> int:
    """`exgra-med generate-vqa-multi --num-chunks K --question-file F --answers-file F [generate-vqa flags]`."""
    parser = argparse.ArgumentParser(
        formatter_class=HelpFormatter,
        prog="exgra-med generate-vqa-multi",
        description=__doc__.splitlines()[0],
        allow_abbrev=False,
        epilog="Every other flag is passed to `exgra-med generate-vqa` (--model, --image-folder, --batch-size, ...).",
    )
    parser.add_argument("--question-file", required=True)
    parser.add_argument("--answers-file", required=True, help="the merged answers file")
    parser.add_argument("--num-chunks", type=int, default=None, help="default: number of visible GPUs, or 1")
    parser.add_argument("--gpus", default=None, help="comma-separated GPU ids (default: CUDA_VISIBLE_DEVICES / all)")
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    gpus = visible_gpus() if args.gpus is None else [g for g in args.gpus.split(",") if g]
    num_chunks = args.num_chunks or max(1, len(gpus))
    if num_chunks < 1:
        raise ValueError(f"--num-chunks must be positive, got {num_chunks}")
    run_chunks(num_chunks, args.answers_file, ["--question-file", args.question_file, *rest], gpus)
    files = [chunk_path(args.answers_file, num_chunks, i) for i in range(num_chunks)]
    n = merge_answers(args.question_file, files, args.answers_file)
    print(f"{n} answers merged into {args.answers_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
