"""`exgra-med chat --model DIR [--image FILE]`: multi-turn terminal chat about an image, answers streamed.

Commands inside the chat: `/image PATH` (new image, new conversation), `/clear` (forget the conversation),
`/exit` (or Ctrl-D) to leave; any other line starting with `/` is refused as an unknown command rather than sent to
the model. PNG, JPEG and DICOM images are accepted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import TextIO

from PIL import Image

from exgra_med.constants import RESEARCH_USE_NOTICE
from exgra_med.conversation import GPT, HUMAN
from exgra_med.data.images import ImageLoadError, load_image
from exgra_med.errors import HelpFormatter, one_line
from exgra_med.model.options import DecodingOptions, ModelOptions
from exgra_med.serve.engine import GenerationSettings, InferenceEngine, Message
from exgra_med.serve.loading import LOAD_ERROR_EXIT_CODE, load_engine
from exgra_med.serve.options import SERVE_MAX_NEW_TOKENS

logger = logging.getLogger(__name__)

USER_PROMPT = "USER: "
ASSISTANT_PREFIX = "ASSISTANT: "

PROG = "exgra-med chat"


class ChatSession:
    """One terminal conversation: history, current image, streamed replies written to `out`."""

    def __init__(self, engine: InferenceEngine, settings: GenerationSettings, out: TextIO | None = None):
        self.engine = engine
        self.settings = settings
        self.out = out if out is not None else sys.stdout  # looked up now: sys.stdout may be replaced after import
        self.history: list[Message] = []
        self.image: Image.Image | None = None

    def set_image(self, path: str) -> None:
        """Load a new image (PNG/JPEG/DICOM) and start a new conversation about it."""
        self.image = load_image(path)
        self.history = []

    def reply(self, question: str) -> str:
        """Stream the answer to `question` to `out`; returns the full answer and records the turn."""
        messages = self.history + [(HUMAN, question)]
        self.out.write(ASSISTANT_PREFIX)
        self.out.flush()
        parts = []
        for piece in self.engine.stream(messages, self.image, self.settings):
            parts.append(piece)
            self.out.write(piece)
            self.out.flush()
        self.out.write("\n")
        self.out.flush()
        answer = "".join(parts)
        self.history = messages + [(GPT, answer)]
        return answer

    def handle(self, line: str) -> bool:
        """Process one input line; returns False when the user asked to leave."""
        line = line.strip()
        if not line:
            return True
        if line in ("/exit", "/quit"):
            return False
        if line == "/clear":
            self.history = []
            self.out.write("(conversation cleared)\n")
        elif line.startswith("/image ") or line == "/image":
            path = line[len("/image"):].strip()
            try:
                self.set_image(path)
                self.out.write(f"(image loaded: {path}; new conversation)\n")
            except ImageLoadError as e:
                self.out.write(f"(cannot use that image: {e})\n")
        elif line.startswith("/"):
            self.out.write(f"(unknown command {line.split()[0]}; commands: /image PATH, /clear, /exit)\n")
        else:
            self.reply(line)
        self.out.flush()
        return True


def build_parser() -> argparse.ArgumentParser:
    """The flags of `exgra-med chat`."""
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
    )
    ModelOptions.add_arguments(p)
    DecodingOptions.add_arguments(p, max_new_tokens=SERVE_MAX_NEW_TOKENS)
    p.add_argument("--image", default=None, help="image to talk about (PNG, JPEG or DICOM)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: load the model, then read questions from the terminal until /exit or end of input."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        engine, settings = load_engine(args)
    except (ValueError, FileNotFoundError) as e:  # a bad folder or flag, quantisation unavailable (UserErrors)
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return LOAD_ERROR_EXIT_CODE
    try:
        return _converse(ChatSession(engine, settings), args.image)
    finally:
        # Stop the batching thread before the interpreter finalises (a daemon thread left inside torch then can
        # abort the process at exit).
        engine.close()


def _converse(session: ChatSession, image: str | None) -> int:
    print(RESEARCH_USE_NOTICE)
    if image:
        try:
            session.set_image(image)
        except ImageLoadError as e:
            print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
            return 2
        print(f"(image loaded: {image})")
    print("Type a question; /image PATH, /clear, /exit.")
    while True:
        try:
            line = input(USER_PROMPT)
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not session.handle(line):
            return 0
