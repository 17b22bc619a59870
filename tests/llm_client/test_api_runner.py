"""The resumable runner: bounded retries, failures recorded once, resume, fatal stops; real HTTP faults."""

from __future__ import annotations

import threading

import pytest
from fake_openai import FakeOpenAI

from exgra_med.llm_client import (
    ApiConfig,
    FatalApiError,
    InvalidReply,
    ItemContext,
    RetryPolicy,
    load_progress,
    make_client,
    run_jobs,
)
from exgra_med.llm_client.chat import chat_request, parse_json_object

FAST = RetryPolicy(max_attempts=3, base_delay=0.001, max_delay=0.01)


class ScriptedWork:
    """work(): item `k` raises InvalidReply `fails[k]` times, then returns k * 2; counts calls."""

    def __init__(self, fails: dict[str, int]) -> None:
        self.fails = dict(fails)
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, job: int, ctx: ItemContext) -> int:
        def request() -> int:
            with self.lock:
                self.calls[ctx.key] = self.calls.get(ctx.key, 0) + 1
                n = self.calls[ctx.key]
            ctx.add_tokens(10)
            if n <= self.fails.get(ctx.key, 0):
                raise InvalidReply(f"try {n}")
            return job * 2

        return ctx.call(request)


def test_retries_are_bounded_and_counted(tmp_path) -> None:
    jobs = {f"k{i}": i for i in range(6)}
    work = ScriptedWork({"k1": 1, "k2": 2, "k3": 3, "k4": 5})
    result = run_jobs(jobs, work, tmp_path / "p.jsonl", policy=FAST, concurrency=3, show_progress=False)
    done = {k for k, e in result.entries.items() if e["ok"]}
    failed = {k for k, e in result.entries.items() if not e["ok"]}
    assert done == {"k0", "k1", "k2", "k5"} and failed == {"k3", "k4"}
    assert work.calls == {"k0": 1, "k1": 2, "k2": 3, "k3": 3, "k4": 3, "k5": 1}  # never more than 3
    assert result.entries["k2"] == {
        "key": "k2",
        "ok": True,
        "value": 4,
        "attempts": 3,
        "retries": 2,
        "tokens": 30,
    }
    assert "gave up after 3 attempts" in result.entries["k3"]["error"]
    s = result.stats
    assert (s.total, s.done, s.failed, s.retried_items, s.retried, s.tokens) == (
        6,
        4,
        2,
        4,
        1 + 2 + 2 + 2,
        130,
    )
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 6


def test_resume_skips_done_and_retries_failed(tmp_path) -> None:
    jobs = {f"k{i}": i for i in range(4)}
    run_jobs(jobs, ScriptedWork({"k1": 9}), tmp_path / "p.jsonl", policy=FAST, show_progress=False)
    again = ScriptedWork({})
    result = run_jobs(jobs, again, tmp_path / "p.jsonl", policy=FAST, resume=True, show_progress=False)
    assert again.calls == {"k1": 1}
    assert (result.stats.skipped, result.stats.done) == (3, 1)
    assert all(e["ok"] for e in result.entries.values())
    kept = ScriptedWork({})
    result = run_jobs(jobs, kept, tmp_path / "p.jsonl", policy=FAST, resume=True, show_progress=False)
    assert kept.calls == {} and result.stats.skipped == 4


def test_seed_entries_are_logged_and_skipped(tmp_path) -> None:
    jobs = {"a": 1, "b": 2}
    work = ScriptedWork({})
    seeds = [{"key": "a", "ok": True, "value": 2, "attempts": 0, "tokens": 0}, {"key": "zzz", "ok": True}]
    result = run_jobs(jobs, work, tmp_path / "p.jsonl", policy=FAST, seed_entries=seeds, show_progress=False)
    assert work.calls == {"b": 1}
    assert sorted(result.entries) == ["a", "b"]  # the stale seed is not a job
    assert sorted(load_progress(tmp_path / "p.jsonl")) == ["a", "b", "zzz"]


def test_fatal_error_stops_the_run_and_keeps_finished_items(tmp_path) -> None:
    jobs = {f"k{i}": i for i in range(20)}

    def work(job: int, ctx: ItemContext) -> int:
        def request() -> int:
            if job == 3:
                raise KeyError("unexpected")  # a bug, not an API fault: stop
            return job

        return ctx.call(request)

    with pytest.raises(FatalApiError, match="item k3"):
        run_jobs(jobs, work, tmp_path / "p.jsonl", policy=FAST, concurrency=1, show_progress=False)
    entries = load_progress(tmp_path / "p.jsonl")
    assert {"k0", "k1", "k2"} <= set(entries) and "k3" not in entries and len(entries) < 20
    assert all(e["ok"] for e in entries.values())


def _one_request(server: FakeOpenAI, key: str, policy: RetryPolicy, tmp_path, timeout: float = 5.0):
    client = make_client(ApiConfig(server.base_url, "sk-test"), timeout=timeout)

    def work(job: str, ctx: ItemContext) -> dict:
        messages = [{"role": "user", "content": f"[[{job}]]"}]
        return chat_request(ctx, client, "m", messages, parse_json_object)

    return run_jobs({key: key}, work, tmp_path / f"{key}.jsonl", policy=policy, show_progress=False)


def test_http_faults_are_retried(tmp_path) -> None:
    plan = {"a": ["500", "503", "garbage"], "b": ["timeout:3.0"], "c": ["malformed", "malformed"]}
    policy = RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05)
    with FakeOpenAI(plan) as server:
        results = {k: _one_request(server, k, policy, tmp_path, timeout=1.5) for k in plan}
        assert server.counts() == {"a": 4, "b": 2, "c": 3}
    for key, retries in (("a", 3), ("b", 1), ("c", 2)):
        entry = results[key].entries[key]
        assert entry["ok"] and entry["value"]["revision"] == f"Extended answer for [[{key}]]."
        assert results[key].stats.retried == retries
    assert results["c"].stats.tokens == 3 * 15  # malformed replies are paid for too


def test_retry_after_is_honoured(tmp_path) -> None:
    with FakeOpenAI({"a": ["429:1"]}) as server:
        result = _one_request(server, "a", RetryPolicy(base_delay=0.01), tmp_path)
        first, second = server.times("a")
    assert result.entries["a"]["ok"] and result.stats.retried == 1
    assert second - first >= 1.0


def test_client_errors_fail_the_item_and_auth_errors_stop(tmp_path) -> None:
    with FakeOpenAI({"bad": ["400"], "auth": ["401"]}) as server:
        result = _one_request(server, "bad", FAST, tmp_path)
        assert not result.entries["bad"]["ok"] and server.count("bad") == 1
        with pytest.raises(FatalApiError, match="401"):
            _one_request(server, "auth", FAST, tmp_path)
        assert server.count("auth") == 1
