"""`exgra-med chat` driven through a pseudo-terminal: questions about a PNG and a DICOM image get the answers the
model gives in-process, over several turns; quantised loading on CPU exits with a clear message."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exgra_med.model.auto import LoadOptions
from exgra_med.serve.engine import GenerationSettings, InferenceEngine

ASSETS = Path(__file__).resolve().parents[2] / "assets"
MAX_TOKENS = 6
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TERM="dumb")


class Terminal:
    """A child process on a pseudo-terminal, read until expected text appears."""

    def __init__(self, cmd: list[str]):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=ENV, close_fds=True)
        os.close(slave)
        self.buffer = ""

    def expect(self, text: str, timeout: float = 120) -> str:
        """Read until `text` appears after the previous match; returns what came before it."""
        deadline = time.time() + timeout
        while text not in self.buffer:
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.time()))
            if not ready:
                raise AssertionError(f"timed out waiting for {text!r}; terminal shows:\n{self.buffer[-2000:]}")
            try:
                data = os.read(self.master, 4096).decode("utf-8", errors="replace")
            except OSError:  # the child closed the terminal
                raise AssertionError(f"process ended before {text!r}; terminal shows:\n{self.buffer[-2000:]}") from None
            self.buffer += data.replace("\r\n", "\n")
        before, self.buffer = self.buffer.split(text, 1)
        return before

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> int:
        code = self.proc.wait(timeout=60)
        os.close(self.master)
        return code


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return InferenceEngine.from_path(str(tiny_model_dir), LoadOptions(device="cpu"))


def _reply(term: Terminal, question: str) -> str:
    term.send(question)
    term.expect("ASSISTANT: ")
    return term.expect("\nUSER: ").strip()


@pytest.mark.slow
def test_chat_answers_questions_about_images(tiny_model_dir, engine, bomb_png):
    settings = GenerationSettings(max_new_tokens=MAX_TOKENS)
    png, dicom = ASSETS / "red_circle.png", ASSETS / "ct_slice.dcm"
    q1, q2, q3 = "What shape is in the image?", "What color is it?", "What kind of scan is this?"
    a1 = engine.answer([("human", q1)], png, settings)
    a2 = engine.answer([("human", q1), ("gpt", a1), ("human", q2)], png, settings)
    a3 = engine.answer([("human", q3)], dicom, settings)
    assert a1 and a2 and a3

    term = Terminal([sys.executable, "-m", "exgra_med.cli", "chat", "--model", str(tiny_model_dir),
                     "--image", str(png), "--max-new-tokens", str(MAX_TOKENS)])
    try:
        banner = term.expect("USER: ")
        assert "Research use only" in banner and f"image loaded: {png}" in banner
        assert _reply(term, q1) == a1
        assert _reply(term, q2) == a2  # the second turn sees the first
        term.send(f"/image {dicom}")
        assert "image loaded" in term.expect("USER: ")
        assert _reply(term, q3) == a3
        term.send("/image no/such/file.png")
        assert "cannot use that image" in term.expect("USER: ")
        term.send(f"/image {bomb_png}")  # a decompression bomb: refused, the session goes on
        assert re.search(r"cannot use that image: image too large", term.expect("USER: "))
        term.send("/foo bar")  # not sent to the model
        assert "unknown command /foo" in term.expect("USER: ")
        assert _reply(term, q2) == engine.answer([("human", q3), ("gpt", a3), ("human", q2)], dicom, settings)
        term.send("/exit")
    finally:
        code = term.close()
    assert code == 0


def test_quantised_loading_on_cpu_exits_with_a_message(tiny_model_dir, capsys, monkeypatch):
    import torch

    from exgra_med.serve.chat import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--model", str(tiny_model_dir), "--load-4bit"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"--load-4bit needs a CUDA GPU .* none was found", err), err


def test_chat_stops_its_batching_thread_before_returning(tiny_model_dir, capsys, monkeypatch):
    """A daemon thread left inside torch at interpreter exit can abort the process (seen as exit code -6)."""
    import io
    import threading

    from exgra_med.serve.chat import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("What colour is the shape?\n/exit\n"))
    before = set(threading.enumerate())  # other tests' engines may hold workers of their own
    assert main(["--model", str(tiny_model_dir), "--max-new-tokens", "2"]) == 0
    assert "ASSISTANT:" in capsys.readouterr().out
    started = [t for t in threading.enumerate() if t.name == "exgra-med-batcher" and t not in before]
    assert not [t for t in started if t.is_alive()]
