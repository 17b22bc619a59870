"""Loading a model for serving: device default, optional 4-/8-bit quantisation (bitsandbytes, CUDA), and the
load-or-exit step shared by the `chat`, `web` and `serve-api` commands.

The loading itself (either checkpoint layout, dtype policy) is `exgra_med.model.checkpoint.load_model`.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from exgra_med.model.checkpoint import load_model as load_checkpoint
from exgra_med.model.checkpoint import resolve_dtype
from exgra_med.serve.engine import GenerationSettings, InferenceEngine
from exgra_med.serve.options import engine_from_args, settings_from_args

logger = logging.getLogger(__name__)

# Kept in full precision when quantising: the frozen tower, the small projector and the output head.
QUANT_SKIP_MODULES = ["vision_tower", "mm_projector", "lm_head", "alignment"]
# Exit status of a serving command whose model cannot be loaded as asked (bad folder, flags, missing extra).
LOAD_ERROR_EXIT_CODE = 2


class QuantizationUnavailableError(RuntimeError):
    """4-/8-bit loading was asked for where it cannot run (no CUDA device or no bitsandbytes)."""


def quantization_config(
    load_4bit: bool = False, load_8bit: bool = False, compute_dtype: torch.dtype = torch.float16
) -> object | None:
    """A `BitsAndBytesConfig` for `--load-4bit` / `--load-8bit`, or None when neither is set.

    Raises QuantizationUnavailableError with what to do when CUDA or bitsandbytes is missing.
    """
    if load_4bit and load_8bit:
        raise ValueError("--load-4bit and --load-8bit are exclusive; choose one")
    if not (load_4bit or load_8bit):
        return None
    flag = "--load-4bit" if load_4bit else "--load-8bit"
    if not torch.cuda.is_available():
        raise QuantizationUnavailableError(
            f"{flag} needs a CUDA GPU (bitsandbytes quantised kernels); none was found. On CPU, drop {flag} "
            "(the model then loads in float32) or pass --dtype bfloat16 to halve the memory."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise QuantizationUnavailableError(
            f"{flag} needs bitsandbytes: pip install 'exgra-med[quant]' (or pip install bitsandbytes)"
        ) from e
    from transformers import BitsAndBytesConfig

    if load_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type="nf4",
            llm_int8_skip_modules=QUANT_SKIP_MODULES,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=QUANT_SKIP_MODULES)


def default_device() -> str:
    """`cuda` when a GPU is visible, else `cpu`."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    path: str,
    vision_tower: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | None = None,
    load_4bit: bool = False,
    load_8bit: bool = False,
    attn_implementation: str = "sdpa",
) -> tuple[object, object, object]:
    """(model, tokenizer, image processor) from an ExGra-Med checkpoint or a reference-layout folder, placed on
    `device` (default: `default_device()`), quantised when asked; dtype as `checkpoint.resolve_dtype` says."""
    device = device or default_device()
    dtype = resolve_dtype(dtype, device)
    quant = quantization_config(load_4bit, load_8bit, compute_dtype=dtype)
    return load_checkpoint(
        path, vision_tower=vision_tower, dtype=dtype, device=device, attn_implementation=attn_implementation,
        quantization_config=quant,
    )


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
