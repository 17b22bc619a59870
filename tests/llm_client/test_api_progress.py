"""Progress log: durable appends, torn last lines after a kill, refusal to silently reuse a log."""

from __future__ import annotations

import json

import pytest

from exgra_med.llm_client.progress import ProgressLog, failures_path_for, load_progress, progress_path_for


def _entry(key: str, ok: bool = True) -> dict:
    return {"key": key, "ok": ok, "value": key.upper()} if ok else {"key": key, "ok": False, "error": "boom"}


def test_paths_sit_next_to_the_output(tmp_path) -> None:
    assert progress_path_for(tmp_path / "out.json") == tmp_path / "out.json.progress.jsonl"
    assert failures_path_for(tmp_path / "out.json") == tmp_path / "out.json.failures.jsonl"


def test_append_then_load_last_entry_wins(tmp_path) -> None:
    path = tmp_path / "p.jsonl"
    log = ProgressLog(path)
    assert log.open(resume=False) == {}
    log.extend([_entry("a"), _entry("b", ok=False), _entry("b")])
    log.close()
    entries = load_progress(path)
    assert sorted(entries) == ["a", "b"]
    assert entries["b"]["ok"] is True
    assert len(path.read_text().splitlines()) == 3


def test_torn_last_line_is_dropped_and_truncated(tmp_path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(_entry("a")) + "\n" + '{"key": "b", "ok": tr')
    assert list(load_progress(path)) == ["a"]
    log = ProgressLog(path)
    assert list(log.open(resume=True)) == ["a"]
    log.append(_entry("c"))
    log.close()
    assert [json.loads(x)["key"] for x in path.read_text().splitlines()] == ["a", "c"]


def test_complete_last_line_without_newline_is_kept(tmp_path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(_entry("a")))
    log = ProgressLog(path)
    assert list(log.open(resume=True)) == ["a"]
    log.append(_entry("b"))
    log.close()
    assert sorted(load_progress(path)) == ["a", "b"]


def test_corrupt_middle_line_and_wrong_shape_raise(tmp_path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text("{broken\n" + json.dumps(_entry("a")) + "\n")
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        load_progress(path)
    path.write_text(json.dumps({"id": 3}) + "\n")
    with pytest.raises(ValueError, match="line 1 is not a progress entry"):
        load_progress(path)


def test_existing_log_needs_resume(tmp_path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(_entry("a")) + "\n")
    with pytest.raises(FileExistsError, match="resume"):
        ProgressLog(path).open(resume=False)
    assert path.read_text().count("\n") == 1  # untouched
