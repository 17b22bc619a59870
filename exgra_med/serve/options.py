"""Command-line options of the `web` and `serve-api` servers beyond the shared model and decoding groups
(`exgra_med.model.options`): the bounds of one server."""

from __future__ import annotations

import argparse

from exgra_med.eval.generate import positive_int

# The servers' answer length: the default and the cap of a request's max_tokens.
SERVE_MAX_NEW_TOKENS = 256
# The engine's schedulers (exgra_med.serve.continuous, exgra_med.serve.batching), the default first.
BATCHING = ("continuous", "static")
# Continuous batching: prompt tokens prefilled per decoding step, plus one per running row (vLLM's
# max_num_batched_tokens); a few image prompts join at once while the running rows wait for one prefill only.
DEFAULT_MAX_BATCH_TOKENS = 2048
# The image memory one server spends at once (exgra_med.serve.image_memory): about five of the largest images the
# default --max-image-pixels admits (40 Mpx RGB: ~170 MB, reduced for the model); how long a request waits for room.
DEFAULT_MAX_IMAGE_MEMORY_MB = 1024
IMAGE_MEMORY_WAIT_S = 30.0


def add_serving_limits(p: argparse.ArgumentParser) -> None:
    """--max-prompt-tokens, --max-batch-size, --max-queue, --batching, --max-batch-tokens, --max-image-memory-mb: the
    bounds and the batching of the `web` and `serve-api` servers."""
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt (history and image tokens included); always at most the model's context "
                   "minus --max-new-tokens")
    p.add_argument("--max-batch-size", type=int, default=8, help="concurrent requests decoded together")
    p.add_argument("--max-queue", type=int, default=32, help="requests allowed to wait; more get HTTP 429 / a message")
    p.add_argument("--batching", choices=BATCHING, default="continuous",
                   help="continuous: requests join and leave the batch at every decoding step; static: a batch runs "
                   "until its longest answer ends (the baseline)")
    p.add_argument("--max-batch-tokens", type=positive_int, default=DEFAULT_MAX_BATCH_TOKENS,
                   help="continuous batching: prompt tokens prefilled per decoding step, plus one per running request "
                   "(a longer prompt is prefilled alone)")
    p.add_argument("--max-image-memory-mb", type=int, default=DEFAULT_MAX_IMAGE_MEMORY_MB,
                   help="memory the server spends on decoding and preprocessing images at once; a request beyond it "
                   f"waits up to {IMAGE_MEMORY_WAIT_S:g} s, then gets HTTP 429 / a busy message (an image that alone "
                   "needs more gets HTTP 413)")
