"""extend-captions against a real local HTTP server that injects faults; kill-and-resume with SIGKILL."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exgra_med.data.extend import build_jobs, default_system_prompt_path, main, parse_revision, user_message
from exgra_med.llm_client import InvalidReply, load_progress

_spec = importlib.util.spec_from_file_location(
    "fake_openai", Path(__file__).parents[1] / "llm_client" / "fake_openai.py"
)
fake_openai = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_openai)
FakeOpenAI = fake_openai.FakeOpenAI

SECRET = "sk-test-SECRET-4242"


def make_records(n: int, multi_turn: bool = True) -> list[dict]:
    """LLaVA-Med instruct records; every answer names its turn key as [[id#turn]] for the fake server."""
    records = []
    for i in range(n):
        conv = [
            {"from": "human", "value": f"What is shown in image {i}?\n<image>"},
            {"from": "gpt", "value": f"A finding [[r{i}#1]] in the left lung."},
        ]
        if multi_turn and i == 0:
            conv += [
                {"from": "human", "value": "Is it malignant?"},
                {"from": "gpt", "value": f"Probably not [[r{i}#3]]."},
            ]
        records.append({"id": f"r{i}", "image": f"img{i}.jpg", "conversations": conv})
    return records


@pytest.fixture
def api_env(monkeypatch, tmp_path):
    """Point the tools at the fake server through the standard variables; no .env is found."""
    monkeypatch.chdir(tmp_path)
    for var in ("OPENROUTER_API_KEY", "OPENROUTER_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("EXGRA_MED_API_BASE_DELAY", "0.01")
    monkeypatch.setenv("EXGRA_MED_API_MAX_DELAY", "0.05")
    return monkeypatch


def test_parse_revision() -> None:
    assert parse_revision('```json\n{"explanation": "e", "revision": "A\\nB  c"}\n```', 50) == {
        "revision": "A B c",
        "explanation": "e",
    }
    assert parse_revision('Sure! {"revision": "ok"} hope it helps', 50)["revision"] == "ok"
    for bad, match in (
        ('{"explanation": "x"}', "revision"),
        ('{"revision": "  "}', "revision"),
        ('{"revision": "' + "x" * 51 + '"}', "51 characters, limit 50"),
        ("not json", "not JSON"),
        ('["revision"]', "not an object"),
    ):
        with pytest.raises(InvalidReply, match=match):
            parse_revision(bad, 50)


def test_jobs_pair_each_answer_with_its_question() -> None:
    jobs = build_jobs(make_records(2))
    assert list(jobs) == ["r0#1", "r0#3", "r1#1"]
    assert jobs["r0#3"].instruction == "Is it malignant?"
    # The pair goes out as one JSON object that keeps the <image> text of the instruction.
    sent = json.loads(user_message(jobs["r1#1"]))
    assert sent == {"instruction": "What is shown in image 1?\n<image>",
                    "answer": "A finding [[r1#1]] in the left lung."}
    assert "<image>" in sent["instruction"]


def test_prompt_file_has_the_references_structure() -> None:
    """Five aspects (each ~20 tokens at most), the see-the-image tone, one worked example whose input is a JSON
    pair and whose output is a JSON reply with `explanation` (one comment per aspect) and `revision`."""
    text = default_system_prompt_path().read_text()
    aspects = ("helpfulness", "relevance", "accuracy", "detail", "structure")
    assert all(a in text.lower() for a in aspects)
    assert text.count("at most about 20 tokens") >= 6 and "as if you were looking at the image" in text
    assert "cannot see the image" not in text
    example_in = next(line for line in text.splitlines() if line.startswith("Input: "))
    example_out = next(line for line in text.splitlines() if line.startswith("Output: "))
    assert text.count("Input: ") == 1 and text.count("Output: ") == 1  # one worked example
    pair = json.loads(example_in[len("Input: "):])
    assert set(pair) == {"instruction", "answer"} and "<image>" in pair["instruction"]
    reply = json.loads(example_out[len("Output: "):])
    assert set(reply) == {"explanation", "revision"} and set(reply["explanation"]) == set(aspects)
    assert "\n" not in reply["revision"] and len(reply["revision"].split()) <= 2 * 20
    parsed = parse_revision(example_out[len("Output: "):], 10_000)
    assert parsed["explanation"] == reply["explanation"] and parsed["revision"] == reply["revision"]


def _args(src: Path, out: Path, base_url: str, *extra: str) -> list[str]:
    return [
        "--original_instruction_fpath",
        str(src),
        "--output",
        str(out),
        "--model_name",
        "test-model",
        "--base-url",
        base_url,
        "--no-progress",
        "--log-level",
        "DEBUG",
        *extra,
    ]


def test_faults_end_in_output_or_failures_exactly_once(api_env, tmp_path, capsys, caplog) -> None:
    records = make_records(12)
    src = tmp_path / "instruct.json"
    src.write_text(json.dumps(records))
    out = tmp_path / "extended.json"
    plan = {
        "r1#1": ["429:0"],
        "r2#1": ["500", "500"],
        "r3#1": ["timeout:3.0"],
        "r4#1": ["malformed"],
        "r5#1": ["norevision", "toolong"],
        "r6#1": ["500"] * 3,
        "r7#1": ["malformed"] * 3,
        "r8#1": ["400"],
        "r0#3": ["503"],
        "r9#1": ["429:1"],
    }
    with FakeOpenAI(plan) as server:
        code = main(
            _args(
                src,
                out,
                server.base_url,
                "--concurrency",
                "3",
                "--max-attempts",
                "3",
                "--request-timeout",
                "1.5",
            )
        )
        counts = server.counts()
        nine = server.times("r9#1")
        auth = {r["authorization"] for r in server.requests}
    assert code == 1
    assert auth == {f"Bearer {SECRET}"}
    expected_counts = {
        "r0#1": 1,
        "r0#3": 2,
        "r1#1": 2,
        "r2#1": 3,
        "r3#1": 2,
        "r4#1": 2,
        "r5#1": 3,
        "r6#1": 3,
        "r7#1": 3,
        "r8#1": 1,
        "r9#1": 2,
        "r10#1": 1,
        "r11#1": 1,
    }
    assert dict(counts) == expected_counts
    assert nine[1] - nine[0] >= 1.0  # Retry-After: 1 honoured

    extended = json.loads(out.read_text())
    failures = [json.loads(x) for x in (tmp_path / "extended.json.failures.jsonl").read_text().splitlines()]
    out_ids = [r["id"] for r in extended]
    fail_ids = [f["id"] for f in failures]
    assert out_ids == ["r0", "r1", "r2", "r3", "r4", "r5", "r9", "r10", "r11"]
    assert fail_ids == ["r6", "r7", "r8"]
    assert sorted(out_ids + fail_ids) == sorted(r["id"] for r in records)
    assert "gave up after 3 attempts" in failures[0]["errors"][0]["error"]
    assert "400" in failures[2]["errors"][0]["error"] and failures[2]["errors"][0]["attempts"] == 1
    r0 = extended[0]
    assert [t["value"] for t in r0["conversations"]] == [
        "What is shown in image 0?\n<image>",
        "Extended answer for [[r0#1]].",
        "Is it malignant?",
        "Extended answer for [[r0#3]].",
    ]
    assert r0["image"] == "img0.jpg"
    stdout = capsys.readouterr()
    # 13 retries: 1+2+1+1+2 (recovered) + 2+2+0 (failed) + 1 (r0#3) + 1 (r9); 16 paid replies x 15 tokens
    assert "13 retries, 240 tokens" in stdout.out
    texts = [stdout.out, stdout.err, caplog.text] + [p.read_text() for p in tmp_path.iterdir() if p.is_file()]
    assert all(SECRET not in t for t in texts)

    # Resume: only the failed items are requested again; every id ends in the output once.
    with FakeOpenAI() as server:
        code = main(_args(src, out, server.base_url, "--resume_from", str(out)))
        assert dict(server.counts()) == {"r6#1": 1, "r7#1": 1, "r8#1": 1}
    assert code == 0
    assert [r["id"] for r in json.loads(out.read_text())] == [r["id"] for r in records]
    assert (tmp_path / "extended.json.failures.jsonl").read_text() == ""


def test_refuses_to_restart_over_existing_work(api_env, tmp_path) -> None:
    src = tmp_path / "instruct.json"
    src.write_text(json.dumps(make_records(3, multi_turn=False)))
    out = tmp_path / "ext.json"
    with FakeOpenAI() as server:
        assert main(_args(src, out, server.base_url)) == 0
        assert main(_args(src, out, server.base_url)) == 2  # output exists, no --resume_from
        out.unlink()
        assert main(_args(src, out, server.base_url)) == 2  # progress exists, no --resume_from
        assert sum(server.counts().values()) == 3
        # Resume into a new file from the old progress: nothing is requested again.
        new = tmp_path / "ext_new.json"
        assert main(_args(src, new, server.base_url, "--resume_from", str(out))) == 0
        assert sum(server.counts().values()) == 3
    assert [r["id"] for r in json.loads(new.read_text())] == ["r0", "r1", "r2"]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(api_env, tmp_path) -> None:
    n = 30
    src = tmp_path / "instruct.json"
    src.write_text(json.dumps(make_records(n, multi_turn=False)))
    out = tmp_path / "ext.json"
    progress = tmp_path / "ext.json.progress.jsonl"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with FakeOpenAI(delay=0.1) as server:
        cmd = [
            sys.executable,
            "-m",
            "exgra_med.cli",
            "extend-captions",
            *_args(src, out, server.base_url, "--concurrency", "2"),
        ]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
            not progress.exists() or len(progress.read_text().splitlines()) < 6
        ):
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # still running
        proc.send_signal(signal.SIGKILL)
        first_out, first_err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        finished = set(load_progress(progress))
        assert 6 <= len(finished) < n and not out.exists()

        resumed = subprocess.run(cmd + ["--resume_from", str(out)], env=env, capture_output=True, timeout=120)
        assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
        counts = server.counts()
    ids = [r["id"] for r in json.loads(out.read_text())]
    assert ids == [f"r{i}" for i in range(n)]  # every id exactly once, in input order
    assert all(counts[key] == 1 for key in finished)  # nothing finished was paid for twice
    assert set(counts) == {f"r{i}#1" for i in range(n)}
    assert sum(counts.values()) - n <= 2  # at most the requests in flight at the kill were repeated
    for stream in (first_out, first_err, resumed.stdout, resumed.stderr):
        assert SECRET.encode() not in stream


def test_bad_inputs_and_missing_key_are_reported(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    for var in ("OPENROUTER_API_KEY", "OPENROUTER_ENDPOINT", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    src = tmp_path / "instruct.json"
    bad = make_records(2, multi_turn=False)
    bad[1]["conversations"][1]["from"] = "assistant"
    src.write_text(json.dumps(bad))
    assert main(["--original_instruction_fpath", str(src)]) == 2
    assert (
        "instruct.json: record r1: conversations[1].from must be 'human' or 'gpt'" in capsys.readouterr().err
    )
    src.write_text(json.dumps(make_records(2, multi_turn=False) * 2))
    assert main(["--original_instruction_fpath", str(src)]) == 2
    assert "record id 'r0' appears more than once" in capsys.readouterr().err
    src.write_text(json.dumps(make_records(2, multi_turn=False)))
    assert main(["--original_instruction_fpath", str(src)]) == 2
    assert "no API key found" in capsys.readouterr().err
    assert not (tmp_path / "instruct.extended.json").exists()
