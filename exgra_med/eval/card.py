"""Reproducibility cards: a JSON file beside every score file, so that a number in a results file can be traced and
rerun.

`exgra-med score --json OUT`, `grounding-audit --out OUT` and `data-efficiency record --out OUT` write `OUT`, then
its card: `scores.json` -> `scores.card.json` (a name not ending in `.json` gets `.card.json` appended). A card
holds the command line as the command received it (`exgra-med <command> ...`) and the folder it ran in, the code
(the git commit of the source tree and whether tracked files differ from it, or the installed version outside a git
checkout), the package versions, the settings the numbers depend on, the seed (where there is one), the hardware
and the wall time. Both files are written atomically, the card last.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from exgra_med import __version__
from exgra_med.io import read_jsonl, write_json_atomic

CARD_SUFFIX = ".card.json"
# The distributions whose versions a card (and a study cell) records.
VERSIONED = ("exgra-med", "torch", "transformers", "accelerate", "deepspeed", "peft", "tokenizers", "numpy",
             "pillow", "nltk")
# The folder holding the exgra_med package: a git checkout's work tree for an editable install.
SOURCE_TREE = Path(__file__).resolve().parents[2]


def card_path(out: str | os.PathLike) -> Path:
    """Where the card of the score file `out` goes: `scores.json` -> `scores.card.json`, `scores` ->
    `scores.card.json`."""
    out = Path(out)
    stem = out.name[: -len(".json")] if out.name.endswith(".json") else out.name
    return out.with_name(stem + CARD_SUFFIX)


def is_card(path: str | os.PathLike) -> bool:
    """Whether `path` is a card (readers of a folder of score files skip these)."""
    return Path(path).name.endswith(CARD_SUFFIX)


def versions() -> dict[str, str]:
    """The Python version and the installed versions of `VERSIONED` (a distribution not installed is left out);
    read from the package metadata, without importing the packages."""
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(SOURCE_TREE), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def code_revision() -> dict[str, Any]:
    """The code that ran: `commit` (git rev-parse HEAD) and `dirty` (tracked files differ from it) when the package
    is imported from a git checkout's work tree, and always the package `version`. A package installed into
    site-packages is not taken for the checkout a virtual environment may sit in."""
    code: dict[str, Any] = {"version": __version__}
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != SOURCE_TREE:
        return code
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    if commit:
        code["commit"] = commit
        code["dirty"] = None if status is None else bool(status)
    return code


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; the platform's processor name elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict[str, Any]:
    """CPU model, cores (all, and those this process may use), memory, and the GPUs torch sees: looked up only when
    the command imported torch (light commands start without it)."""
    found: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    try:
        found["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):  # no sysconf names (Windows)
        pass
    torch = sys.modules.get("torch")
    if torch is None:
        found["gpus"] = None
        found["gpus_note"] = "not looked up: this command runs without torch"
    elif torch.cuda.is_available():
        found["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        found["cuda"] = torch.version.cuda
    else:
        found["gpus"] = []
    return found


def file_entry(path: str | os.PathLike) -> dict[str, Any]:
    """An input file: its resolved path, size and SHA-256, and the path of its own card when it has one."""
    path = Path(path)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    entry: dict[str, Any] = {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}
    if card_path(path).is_file():
        entry["card"] = str(card_path(path).resolve())
    return entry


def answers_generation(path: str | os.PathLike) -> dict | list[dict] | None:
    """The generation settings an answers file's lines record (`metadata.generation`, written by `generate-vqa` and
    `grounding-audit --answers-file`): one dict when they agree, the distinct ones when they do not, None when no
    line records any."""
    found: list[dict] = []
    for row in read_jsonl(path):
        generation = (row.get("metadata") or {}).get("generation") if isinstance(row, dict) else None
        if isinstance(generation, dict) and generation not in found:
            found.append(generation)
    if not found:
        return None
    return found[0] if len(found) == 1 else found


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class RunCard:
    """The card of one command run: started when the command starts (`RunCard("score", argv)`), written beside the
    score file when it is written (`write`)."""

    def __init__(self, command: str, argv: Sequence[str] | None = None) -> None:
        args = list(sys.argv[1:] if argv is None else argv)
        self.command = shlex.join(["exgra-med", command, *args])
        self.cwd = os.getcwd()
        self.started = time.time()
        self._clock = time.perf_counter()

    def write(self, out: str | os.PathLike, settings: Mapping[str, Any], seed: int | None = None) -> Path:
        """Write the card of the score file `out` (`card_path`) with the command's `settings` and `seed`; returns
        its path."""
        seconds = time.perf_counter() - self._clock
        card = {
            "score_file": str(Path(out).resolve()),
            "command": self.command,
            "cwd": self.cwd,
            "code": code_revision(),
            "versions": versions(),
            "settings": dict(settings),
            "seed": seed,
            "hardware": hardware(),
            "time": {"start_utc": _utc(self.started), "end_utc": _utc(self.started + seconds), "seconds": seconds},
        }
        path = card_path(out)
        write_json_atomic(path, card)
        return path
