"""Command-line options of the `web` and `serve-api` servers beyond the shared model and decoding groups
(`exgra_med.model.options`): the bounds of one server."""

from __future__ import annotations

import argparse

# The servers' answer length: the default and the cap of a request's max_tokens.
SERVE_MAX_NEW_TOKENS = 256
# The engine's schedulers (exgra_med.serve.continuous, exgra_med.serve.batching), the default first.
BATCHING = ("continuous", "static")
# Continuous batching: prompt tokens prefilled per decoding step, plus one per running row (vLLM's
# max_num_batched_tokens); a few image prompts join at once while the running rows wait for one prefill only.
DEFAULT_MAX_BATCH_TOKENS = 2048


def add_serving_limits(p: argparse.ArgumentParser) -> None:
    """--max-prompt-tokens, --max-batch-size, --max-queue, --batching, --max-batch-tokens: the bounds and the batching
    of the `web` and `serve-api` servers."""
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt (history and image tokens included); always at most the model's context "
                   "minus --max-new-tokens")
    p.add_argument("--max-batch-size", type=int, default=8, help="concurrent requests decoded together")
    p.add_argument("--max-queue", type=int, default=32, help="requests allowed to wait; more get HTTP 429 / a message")
    p.add_argument("--batching", choices=BATCHING, default="continuous",
                   help="continuous: requests join and leave the batch at every decoding step; static: a batch runs "
                   "until its longest answer ends (the baseline)")
    p.add_argument("--max-batch-tokens", type=int, default=DEFAULT_MAX_BATCH_TOKENS,
                   help="continuous batching: prompt tokens prefilled per decoding step, plus one per running request "
                   "(a longer prompt is prefilled alone)")
