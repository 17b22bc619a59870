"""The load-or-exit step shared by the `chat`, `web` and `serve-api` commands.

Their model and decoding flags are the shared groups of `exgra_med.model.options`; the loading itself (any model
family, device and dtype defaults, 4-/8-bit weights) is `exgra_med.model.auto.load_backend`.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from exgra_med.errors import one_line
from exgra_med.model.options import DecodingOptions, ModelOptions
from exgra_med.model.quantization import QuantizationUnavailableError
from exgra_med.serve.engine import GenerationSettings, InferenceEngine
from exgra_med.serve.options import DEFAULT_MAX_BATCH_TOKENS

logger = logging.getLogger(__name__)

# Exit status of a serving command whose model cannot be loaded as asked (bad folder, flags, missing extra).
LOAD_ERROR_EXIT_CODE = 2


def generation_settings(decoding: DecodingOptions) -> GenerationSettings:
    """The engine's default decoding settings from the `--max-new-tokens`, `--temperature` and `--top-p` flags."""
    return GenerationSettings(max_new_tokens=decoding.max_new_tokens, temperature=decoding.temperature,
                              top_p=decoding.top_p)


def load_engine(args: argparse.Namespace) -> tuple[InferenceEngine, GenerationSettings]:
    """(engine, decoding settings) for the parsed model, decoding and (optional) serving-limit flags; seeds torch.
    Raises QuantizationUnavailableError on CPU with --load-4bit / --load-8bit."""
    options, decoding = ModelOptions.from_args(args), DecodingOptions.from_args(args)
    settings = generation_settings(decoding)
    torch.manual_seed(decoding.seed)
    engine = InferenceEngine.from_path(
        options.model,
        options.load_options(),
        max_prompt_tokens=getattr(args, "max_prompt_tokens", None),
        max_batch_size=getattr(args, "max_batch_size", 8),
        max_queue=getattr(args, "max_queue", 32),
        batching=getattr(args, "batching", "continuous"),
        max_batch_tokens=getattr(args, "max_batch_tokens", DEFAULT_MAX_BATCH_TOKENS),
    )
    return engine, settings


def load_engine_or_exit_code(
    args: argparse.Namespace, prog: str
) -> tuple[InferenceEngine, GenerationSettings] | int:
    """`load_engine`; on a user error (bad folder or flags, quantisation unavailable) prints `prog: error: message` as
    one line to stderr, as every command does, and returns LOAD_ERROR_EXIT_CODE."""
    try:
        return load_engine(args)
    except (QuantizationUnavailableError, ValueError, FileNotFoundError) as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return LOAD_ERROR_EXIT_CODE
