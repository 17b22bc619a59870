"""Loading a model for serving: either checkpoint layout, optional 4-/8-bit quantisation (bitsandbytes, CUDA)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Kept in full precision when quantising: the frozen tower, the small projector and the output head.
QUANT_SKIP_MODULES = ["vision_tower", "mm_projector", "lm_head", "alignment"]


class QuantizationUnavailableError(RuntimeError):
    """4-/8-bit loading was asked for where it cannot run (no CUDA device or no bitsandbytes)."""


def quantization_config(load_4bit: bool = False, load_8bit: bool = False) -> object | None:
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
            bnb_4bit_compute_dtype=torch.float16,
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
    """(model, tokenizer, image processor) from an ExGra-Med checkpoint or a reference-layout folder.

    Reference-layout folders need their vision tower (`vision_tower`, or a local `mm_vision_tower` in config).
    On CUDA the default dtype is float16; on CPU float32.
    """
    from exgra_med.model.loading import is_exgra_med_checkpoint, load_pretrained
    from exgra_med.model.reference import is_reference_checkpoint, load_reference

    quant = quantization_config(load_4bit, load_8bit)
    device = device or default_device()
    if dtype is None:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: model folder not found")
    if is_exgra_med_checkpoint(path):
        overrides = {"quantization_config": quant, "device_map": {"": device}} if quant is not None else {}
        model, tokenizer, processor = load_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation,
            device=None if quant is not None else device, **overrides,
        )
    elif is_reference_checkpoint(path):
        model, tokenizer, processor = load_reference(
            path, vision_tower, dtype=dtype, attn_implementation=attn_implementation,
            device=device, quantization_config=quant,
        )
        if quant is not None:
            model.vision_tower.to(device)
            model.mm_projector.to(device)
    else:
        raise ValueError(
            f"{path}: neither an ExGra-Med checkpoint (config.json model_type 'exgra_med') nor a reference "
            "LLaVA-Med checkpoint (architectures ['LlavaLlamaForCausalLM'])"
        )
    logger.info("model %s loaded on %s (%s%s)", path, device, dtype, ", quantised" if quant is not None else "")
    return model.eval(), tokenizer, processor
