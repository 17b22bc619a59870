"""The command-line frame shared by the API job commands (`extend-captions`, `chatbot-review`).

A command parses its own flags and describes one run as a `JobPlan`: its jobs, where their progress is
logged, how it resumes, what each job requests and what is written at the end. `run_job_command` does
the rest the same way for every command: the API flags, logging, client and retry policy, the resumable
run, and the error lines (`<command>: <message>` on stderr) with their exit codes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from exgra_med.llm_client.cli_args import add_api_arguments, runtime_from_args
from exgra_med.llm_client.retry import FatalApiError
from exgra_med.llm_client.runner import ItemContext, RunResult, run_jobs

T = TypeVar("T")


@dataclass(frozen=True)
class JobPlan(Generic[T]):
    """One run of an API job command, built from its parsed flags and validated inputs."""

    jobs: Mapping[str, T]
    """Jobs by progress-log key, in output order."""
    progress_path: Path
    """Progress log of the run; jobs finished in it are skipped on resume."""
    work: Callable[[T, ItemContext, Any], Any]
    """`work(job, ctx, client)`: the job's requests, made through `ctx`; returns the value to log."""
    finish: Callable[[RunResult], int]
    """Writes the outputs of a run that was not stopped; returns the exit code (0 all done, 1 some not)."""
    resume: bool
    """Continue an existing progress log; without it an existing log is an error."""
    retry_failed: bool
    """Retry the jobs that failed in an earlier run."""
    rerun_hint: str
    """What to do after a fatal stop, e.g. `finished items are kept, rerun with --resume`."""
    seed_entries: Sequence[dict] = ()
    """Finished entries found elsewhere (an earlier run's output), logged before the run starts."""


def _fail(command: str, message: str, code: int) -> int:
    print(f"{command}: {message}", file=sys.stderr)
    return code


def run_job_command(
    command: str,
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    plan: Callable[[argparse.Namespace], JobPlan[T]],
    default_concurrency: int = 8,
) -> int:
    """Add the API flags to `parser`, parse `argv`, build the plan and the client, run the jobs.

    Returns the exit code: `plan.finish`'s after a run; 2 for bad inputs or configuration (an `OSError`,
    `ValueError` or `RuntimeError` from `plan` or from reading the key) and for an existing progress log
    without resume; 1 when a fatal API error stopped the run.
    """
    add_api_arguments(parser, default_concurrency=default_concurrency)
    args = parser.parse_args(argv)
    try:
        job_plan = plan(args)
        runtime = runtime_from_args(args)  # after the inputs, so that their errors come first
    except (OSError, ValueError, RuntimeError) as e:
        return _fail(command, str(e), 2)
    try:
        result = run_jobs(
            job_plan.jobs,
            lambda job, ctx: job_plan.work(job, ctx, runtime.client),
            job_plan.progress_path,
            policy=runtime.policy,
            concurrency=runtime.concurrency,
            resume=job_plan.resume,
            seed_entries=job_plan.seed_entries,
            retry_failed=job_plan.retry_failed,
            desc=command,
            show_progress=runtime.show_progress,
        )
    except FileExistsError as e:
        return _fail(command, str(e), 2)
    except FatalApiError as e:
        return _fail(command, f"stopped: {e}; {job_plan.rerun_hint}", 1)
    return job_plan.finish(result)
