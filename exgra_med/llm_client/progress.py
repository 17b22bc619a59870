"""Append-only JSON-lines log of finished items: the state a killed run resumes from.

Each line is one finished item: `{"key", "ok": true, "value", "attempts", "tokens"}` or
`{"key", "ok": false, "error", "attempts", "tokens"}`. Lines are written whole and flushed (and
fsynced) one at a time, so a killed process leaves at most one torn last line, which `load` drops.
A later line for the same key replaces an earlier one (a failed item that succeeds on resume).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

logger = logging.getLogger(__name__)


def progress_path_for(output: str | os.PathLike) -> Path:
    """Where the progress log of a run writing `output` lives: next to it, `<output>.progress.jsonl`."""
    output = Path(output)
    return output.with_name(output.name + ".progress.jsonl")


def failures_path_for(output: str | os.PathLike) -> Path:
    """Where the failures of a run writing `output` are listed: `<output>.failures.jsonl`."""
    output = Path(output)
    return output.with_name(output.name + ".failures.jsonl")


def _read_valid_prefix(path: Path) -> tuple[dict[str, dict], int]:
    """Parse `path`; returns (entries by key, byte length of the well-formed prefix)."""
    entries: dict[str, dict] = {}
    data = path.read_bytes()
    offset = 0
    lineno = 0
    while offset < len(data):
        end = data.find(b"\n", offset)
        lineno += 1
        last = end == -1
        raw = data[offset:] if last else data[offset:end]
        try:
            entry = json.loads(raw.decode("utf-8")) if raw.strip() else None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if last:
                logger.warning("%s: dropping torn last line %d (interrupted write)", path, lineno)
                break
            raise ValueError(
                f"{path}: line {lineno} is not valid JSON ({e}); the progress log is corrupt"
            ) from e
        if last:  # a complete JSON value without its newline: keep it, the newline is added on open
            if entry is not None:
                entries[_key_of(entry, path, lineno)] = entry
            offset = len(data)
            break
        if entry is not None:
            entries[_key_of(entry, path, lineno)] = entry
        offset = end + 1
    return entries, offset


def _key_of(entry: Any, path: Path, lineno: int) -> str:
    if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or "ok" not in entry:
        raise ValueError(f"{path}: line {lineno} is not a progress entry (needs string 'key' and 'ok')")
    return entry["key"]


def load_progress(path: str | os.PathLike) -> dict[str, dict]:
    """Entries of a progress log by key (last line per key wins); {} when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return {}
    return _read_valid_prefix(path)[0]


class ProgressLog:
    """An open progress log: `append` writes one finished item durably."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        self._file: TextIO | None = None

    def open(self, resume: bool) -> dict[str, dict]:
        """Open for appending and return the entries already there.

        Without `resume` an existing non-empty log is an error: continuing silently could pay twice for
        work, and discarding it would lose paid work.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > 0:
            if not resume:
                raise FileExistsError(
                    f"{self.path} holds progress of an earlier run; resume it (--resume_from / --resume) "
                    "or move the file away"
                )
            self.entries, valid = _read_valid_prefix(self.path)
            with self.path.open("r+b") as f:
                f.truncate(valid)
                if valid > 0:
                    f.seek(valid - 1)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
        self._file = self.path.open("a", encoding="utf-8")
        return dict(self.entries)

    def append(self, entry: dict) -> None:
        """Write one entry as one line, flush and fsync it."""
        if self._file is None:
            raise RuntimeError("ProgressLog.append before open()")
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.entries[entry["key"]] = entry

    def extend(self, entries: Iterable[dict]) -> None:
        """Append several entries (e.g. items found finished in another run's output)."""
        for entry in entries:
            self.append(entry)

    def close(self) -> None:
        """Close the file; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
