"""The load-or-exit step shared by the `chat`, `web` and `serve-api` commands.

The loading itself (any model family, device and dtype defaults, 4-/8-bit weights) is
`exgra_med.model.auto.load_backend`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from exgra_med.model.quantization import QuantizationUnavailableError
from exgra_med.serve.engine import GenerationSettings, InferenceEngine
from exgra_med.serve.options import engine_from_args, settings_from_args

logger = logging.getLogger(__name__)

# Exit status of a serving command whose model cannot be loaded as asked (bad folder, flags, missing extra).
LOAD_ERROR_EXIT_CODE = 2


def load_engine_or_exit_code(
    args: argparse.Namespace, prog: str
) -> tuple[InferenceEngine, GenerationSettings] | int:
    """(engine, decoding settings) for the flags of `options.add_model_arguments`; on a user error (bad folder or
    flags, quantisation unavailable) prints `prog: message` as one line to stderr and returns LOAD_ERROR_EXIT_CODE."""
    try:
        settings = settings_from_args(args)
        engine = engine_from_args(args)
    except (QuantizationUnavailableError, ValueError, FileNotFoundError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return LOAD_ERROR_EXIT_CODE
    return engine, settings
