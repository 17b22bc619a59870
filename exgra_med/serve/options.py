"""Command-line options of the `web` and `serve-api` servers beyond the shared model and decoding groups
(`exgra_med.model.options`): the bounds of one server."""

from __future__ import annotations

import argparse

# The servers' answer length: the default and the cap of a request's max_tokens.
SERVE_MAX_NEW_TOKENS = 256


def add_serving_limits(p: argparse.ArgumentParser) -> None:
    """--max-prompt-tokens, --max-batch-size, --max-queue: the bounds of the `web` and `serve-api` servers."""
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt (history and image tokens included); always at most the model's context "
                   "minus --max-new-tokens")
    p.add_argument("--max-batch-size", type=int, default=8, help="concurrent requests decoded together")
    p.add_argument("--max-queue", type=int, default=32, help="requests allowed to wait; more get HTTP 429 / a message")
