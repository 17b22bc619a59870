"""`run_job_command`: flags, the run, and the stderr lines and exit codes every API job command shares."""

from __future__ import annotations

import argparse
import json

import pytest

from exgra_med.llm_client import FatalApiError
from exgra_med.llm_client.job_cli import JobPlan, run_job_command


@pytest.fixture
def api_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for var in ("OPENROUTER_API_KEY", "OPENROUTER_ENDPOINT", "OPENAI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-job-cli")
    return tmp_path


def _command(tmp_path, fatal_key: str | None = None, bad_input: bool = False):
    """A toy command: doubles its numbers, writes them, exits 0; `fatal_key` stops the run there."""

    def plan(args: argparse.Namespace) -> JobPlan[int]:
        if bad_input:
            raise ValueError("numbers.json: record 2 is not a number")

        def work(job: int, ctx, client) -> int:
            assert client is not None
            if ctx.key == fatal_key:
                raise FatalApiError(f"item {ctx.key}: 401 bad key")
            return 2 * job

        def finish(result) -> int:
            (tmp_path / "out.json").write_text(json.dumps({k: e["value"] for k, e in result.entries.items()}))
            return 0

        return JobPlan(
            jobs={"a": 1, "b": 2, "c": 3},
            progress_path=tmp_path / "out.json.progress.jsonl",
            work=work,
            finish=finish,
            resume=args.resume,
            retry_failed=True,
            rerun_hint="finished items are kept, rerun with --resume",
        )

    parser = argparse.ArgumentParser(prog="exgra-med toy")
    parser.add_argument("--resume", action="store_true")
    return parser, plan


def test_run_then_existing_progress_needs_resume(api_env, capsys) -> None:
    parser, plan = _command(api_env)
    assert run_job_command("toy", parser, ["--no-progress"], plan) == 0
    assert json.loads((api_env / "out.json").read_text()) == {"a": 2, "b": 4, "c": 6}
    parser, plan = _command(api_env)
    assert run_job_command("toy", parser, ["--no-progress"], plan) == 2
    err = capsys.readouterr().err
    assert err.startswith("toy: ") and "out.json.progress.jsonl" in err
    parser, plan = _command(api_env)
    assert run_job_command("toy", parser, ["--no-progress", "--resume"], plan) == 0


def test_fatal_error_stops_with_rerun_hint(api_env, capsys) -> None:
    parser, plan = _command(api_env, fatal_key="b")
    assert run_job_command("toy", parser, ["--no-progress", "--concurrency", "1"], plan) == 1
    err = capsys.readouterr().err.strip()
    assert err == "toy: stopped: item b: 401 bad key; finished items are kept, rerun with --resume"
    assert not (api_env / "out.json").exists()


def test_input_error_comes_before_the_key(api_env, monkeypatch, capsys) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    parser, plan = _command(api_env, bad_input=True)
    assert run_job_command("toy", parser, [], plan) == 2
    assert capsys.readouterr().err.strip() == "toy: numbers.json: record 2 is not a number"
    parser, plan = _command(api_env)
    assert run_job_command("toy", parser, [], plan) == 2
    assert capsys.readouterr().err.startswith("toy: no API key found")


def test_api_flags_are_added_with_the_command_default(api_env) -> None:
    parser, _ = _command(api_env)
    seen = {}

    def plan(args):
        seen["concurrency"] = args.concurrency
        raise ValueError("stop here")

    assert run_job_command("toy", parser, [], plan, default_concurrency=4) == 2
    assert seen == {"concurrency": 4}
