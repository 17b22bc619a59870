"""A resumable, concurrent runner of API jobs: one place for concurrency, retries, progress and resume.

`run_jobs` takes jobs by key and a `work(job, ctx)` function that makes its requests through
`ctx.call(request)`. Every finished job (done or failed) is appended to a progress log as soon as it
finishes; jobs already done in that log are skipped, so a killed run can be rerun without paying twice.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from exgra_med.llm_client.progress import ProgressLog
from exgra_med.llm_client.retry import (
    ErrorKind,
    FatalApiError,
    RetryPolicy,
    Throttle,
    classify,
    retry_after_seconds,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")


class ItemFailed(Exception):
    """A job that cannot be completed: retries exhausted or an error that retrying cannot fix."""


class _Aborted(Exception):
    """The run is stopping; the job is left unfinished (it will be redone on resume)."""


@dataclass
class RunStats:
    """Counters of one run; `skipped` jobs were already finished in the progress log.

    `retried_items` counts jobs that needed at least one retry, `retried` all retries.
    """

    total: int = 0
    skipped: int = 0
    done: int = 0
    failed: int = 0
    retried_items: int = 0
    retried: int = 0
    tokens: int = 0


@dataclass
class RunResult:
    """Final progress entries of every job that is finished (done or failed), and the counters."""

    entries: dict[str, dict] = field(default_factory=dict)
    stats: RunStats = field(default_factory=RunStats)


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


class ItemContext:
    """Per-job handle given to `work`: makes requests with retries and accounts tokens."""

    def __init__(self, key: str, shared: _Shared) -> None:
        self.key = key
        self.attempts = 0
        self.retries = 0
        self.tokens = 0
        self._shared = shared

    def add_tokens(self, n: int) -> None:
        """Count tokens billed for one response (also for replies that fail validation)."""
        self.tokens += n
        with self._shared.lock:
            self._shared.stats.tokens += n

    def call(self, request: Callable[[], T]) -> T:
        """Run `request()` with bounded retries; raises `ItemFailed` or `FatalApiError` when it cannot."""
        shared = self._shared
        policy = shared.policy
        for attempt in range(1, policy.max_attempts + 1):
            shared.throttle.wait(shared.stop)
            if shared.stop.is_set():
                raise _Aborted()
            self.attempts += 1
            try:
                return request()
            except Exception as exc:  # noqa: BLE001 - classified below; unknown kinds stop the run
                kind = classify(exc)
                reason = _describe(exc)
                if kind is ErrorKind.FATAL:
                    raise FatalApiError(f"item {self.key}: {reason}") from exc
                if kind is ErrorKind.ITEM:
                    raise ItemFailed(reason) from exc
                if attempt == policy.max_attempts:
                    raise ItemFailed(f"gave up after {attempt} attempts; last error {reason}") from exc
                asked = retry_after_seconds(exc)
                if asked is not None and asked > policy.max_retry_after:
                    raise ItemFailed(
                        f"server asked to wait {asked:.0f}s (> max_retry_after); {reason}"
                    ) from exc
                with shared.lock:
                    delay = policy.backoff(attempt, shared.rng)
                    shared.stats.retried += 1
                self.retries += 1
                if asked is not None:
                    delay = max(delay, asked)
                    if getattr(exc, "status_code", None) == 429:
                        shared.throttle.pause_for(asked)  # the rate limit is shared by all workers
                logger.info(
                    "item %s: attempt %d failed (%s); retry in %.2fs", self.key, attempt, reason, delay
                )
                shared.stop.wait(delay)
        raise AssertionError("unreachable")  # pragma: no cover


@dataclass
class _Shared:
    policy: RetryPolicy
    stats: RunStats
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    throttle: Throttle = field(default_factory=Throttle)
    rng: random.Random = field(default_factory=random.Random)


def _run_one(key: str, job: Any, work: Callable[[Any, ItemContext], Any], shared: _Shared) -> dict:
    ctx = ItemContext(key, shared)
    try:
        value = work(job, ctx)
    except ItemFailed as e:
        return {
            "key": key,
            "ok": False,
            "error": str(e),
            "attempts": ctx.attempts,
            "retries": ctx.retries,
            "tokens": ctx.tokens,
        }
    return {
        "key": key,
        "ok": True,
        "value": value,
        "attempts": ctx.attempts,
        "retries": ctx.retries,
        "tokens": ctx.tokens,
    }


def run_jobs(
    jobs: Mapping[str, T],
    work: Callable[[T, ItemContext], Any],
    progress_path: str | Path,
    *,
    policy: RetryPolicy,
    concurrency: int = 4,
    resume: bool = False,
    seed_entries: Iterable[dict] = (),
    retry_failed: bool = True,
    desc: str = "items",
    show_progress: bool = True,
) -> RunResult:
    """Run `work` on every job not yet done in the progress log at `progress_path`.

    `seed_entries` are finished entries found elsewhere (another run's output) that are written to the
    log first. Jobs that failed in an earlier run are retried when `retry_failed`. Returns the final
    entries of all finished jobs; jobs left unfinished (a fatal error, Ctrl-C) are absent.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    log = ProgressLog(progress_path)
    entries = log.open(resume=resume)
    try:
        for entry in seed_entries:
            old = entries.get(entry["key"])
            if old is None or (entry["ok"] and not old["ok"]):
                log.append(entry)
                entries[entry["key"]] = entry
        stale = sum(1 for k in entries if k not in jobs)
        if stale:
            logger.warning("%s: %d entries belong to no current job; ignored", progress_path, stale)
        todo = [k for k in jobs if k not in entries or (retry_failed and not entries[k]["ok"])]
        stats = RunStats(total=len(jobs), skipped=len(jobs) - len(todo))
        shared = _Shared(policy=policy, stats=stats, rng=random.Random(policy.seed))
        logger.info("%d %s: %d finished earlier, %d to run", len(jobs), desc, stats.skipped, len(todo))
        bar = tqdm(total=len(todo), desc=desc, unit="item", disable=not show_progress or not todo)

        def record(future: Future) -> BaseException | None:
            """Log a finished future's entry; returns its exception if it raised one."""
            try:
                entry = future.result()
            except _Aborted:
                return None
            except BaseException as e:  # noqa: BLE001 - re-raised by the caller
                return e
            log.append(entry)
            entries[entry["key"]] = entry
            stats.retried_items += 1 if entry.get("retries") else 0
            if entry["ok"]:
                stats.done += 1
            else:
                stats.failed += 1
                logger.warning("item %s failed: %s", entry["key"], entry["error"])
            bar.update(1)
            bar.set_postfix(
                done=stats.done,
                failed=stats.failed,
                retried=stats.retried_items,
                retries=stats.retried,
                tokens=stats.tokens,
                refresh=False,
            )
            return None

        pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="api-job")
        pending: set[Future] = set()
        queue = iter(todo)
        error: BaseException | None = None
        try:
            while error is None:
                while len(pending) < 2 * concurrency:  # a bounded window keeps memory flat
                    key = next(queue, None)
                    if key is None:
                        break
                    pending.add(pool.submit(_run_one, key, jobs[key], work, shared))
                if not pending:
                    break
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    error = record(future) or error
        finally:
            # Stop workers, then keep what the in-flight requests still deliver: it is paid for.
            shared.stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            for future in pending:
                if future.done() and not future.cancelled():
                    error = record(future) or error
            bar.close()
        if error is not None:
            raise error
    finally:
        log.close()
    logger.info(
        "%s: %d done, %d failed, %d retries, %d tokens",
        desc,
        stats.done,
        stats.failed,
        stats.retried,
        stats.tokens,
    )
    return RunResult(entries={k: e for k, e in entries.items() if k in jobs}, stats=stats)
