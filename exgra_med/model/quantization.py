"""bitsandbytes quantisation of the LLM (QLoRA training: `--bits 4|8`) and its undoing in saved weights.

- `bnb_config`: the `BitsAndBytesConfig` the LLM loads with; the vision tower, the projector, the alignment head and
  the output head stay unquantised.
- `skip_at_any_depth`: skip entries for a VLM's vision encoder and projector, wherever they sit in the model.
- `check_bitsandbytes`: a capability check run before any model is loaded; bitsandbytes 0.50 has CPU kernels
  for 4- and 8-bit layers, older versions and machines without a backend fail it with one line.
- `dequantize_bnb_state`: the dense float32 weights of a state dict saved from a quantised model (a QLoRA
  checkpoint: packed 4-bit weights with their quantisation state, or int8 weights with their row scales), so that
  `merge-lora` can fold the adapters in and write a full-precision checkpoint.
"""

from __future__ import annotations

import re

import torch
from transformers import BitsAndBytesConfig

from exgra_med.errors import UserError

QUANT_BITS = (4, 8, 16)
QUANT_TYPES = ("nf4", "fp4")
# Kept in full precision: the frozen tower, the small projector, the alignment head and the output head.
QUANT_SKIP_MODULES = ["vision_tower", "mm_projector", "alignment", "lm_head"]
_QUANT_STATE_KEY = re.compile(r"^(?P<weight>.+\.weight)\.quant_state\.bitsandbytes__(?P<type>nf4|fp4)$")
_4BIT_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


class QuantizationUnavailableError(UserError):
    """`--bits 4|8` where bitsandbytes is missing or has no backend for this machine."""


def bnb_config(bits: int, compute_dtype: torch.dtype, double_quant: bool = True, quant_type: str = "nf4"):
    """The `BitsAndBytesConfig` for `bits` (4 or 8): LLaVA's QLoRA settings (compute dtype, double quantisation,
    nf4/fp4), with `QUANT_SKIP_MODULES` unquantised."""
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_quant_type=quant_type,
            llm_int8_skip_modules=QUANT_SKIP_MODULES,
        )
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=QUANT_SKIP_MODULES)
    raise ValueError(f"--bits must be 4 or 8 for a quantised model, got {bits}")


def inference_bnb_config(bits: int, compute_dtype: torch.dtype | None, skip_modules) -> object | None:
    """The `BitsAndBytesConfig` of 4- / 8-bit weights for answering (NF4 with double quantisation, the QLoRA
    format), `skip_modules` unquantised; None for 16 bits. Raises QuantizationUnavailableError (one line: what to
    do) without a CUDA device or without bitsandbytes."""
    if bits == 16:
        return None
    flag = f"--load-{bits}bit"
    if not torch.cuda.is_available():
        raise QuantizationUnavailableError(
            f"{flag} needs a CUDA GPU (bitsandbytes quantised kernels); none was found. On CPU, drop {flag} "
            "(the model then loads in float32) or pass --dtype bfloat16 to halve the memory."
        )
    try:
        # lazy: bitsandbytes is optional (the quant extra)
        import bitsandbytes  # noqa: F401 - the capability check
    except ImportError as e:
        raise QuantizationUnavailableError(
            f"{flag} needs bitsandbytes: pip install 'exgra-med[quant]' (or pip install bitsandbytes)"
        ) from e
    config = bnb_config(bits, compute_dtype or torch.float16)
    config.llm_int8_skip_modules = skip_at_any_depth(skip_modules)  # e.g. Qwen2.5-VL's model.visual.*
    return config


def skip_at_any_depth(names) -> list[str]:
    """`llm_int8_skip_modules` entries that keep the modules named `names` (a name component, e.g. "visual")
    unquantised wherever they sit: transformers matches an entry from the start of the full module name or as its
    suffix, so "visual" alone would quantise Qwen2.5-VL's `model.visual.blocks.0.attn.qkv`."""
    return [rf"(?:.*\.)?{re.escape(name)}" for name in names]


def _probe(bits: int, device: torch.device, compute_dtype: torch.dtype, quant_type: str) -> None:
    """Quantise a small linear layer on `device`, run it forward and backward (what QLoRA training does)."""
    # lazy: bitsandbytes is optional (the quant extra)
    import bitsandbytes as bnb

    torch_layer = torch.nn.Linear(64, 64, bias=False)
    if bits == 4:
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=compute_dtype, quant_type=quant_type)
        layer.weight = bnb.nn.Params4bit(torch_layer.weight.data, requires_grad=False, quant_type=quant_type)
    else:
        layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(torch_layer.weight.data, requires_grad=False, has_fp16_weights=False)
    layer = layer.to(device)
    x = torch.randn(2, 64, device=device, dtype=compute_dtype, requires_grad=True)
    out = layer(x)
    out.float().sum().backward()
    if not (torch.isfinite(out).all() and x.grad is not None and torch.isfinite(x.grad).all()):
        raise RuntimeError("non-finite output")


def check_bitsandbytes(bits: int, device: str | torch.device, compute_dtype: torch.dtype,
                       quant_type: str = "nf4") -> None:
    """Raise QuantizationUnavailableError (one line: what is missing, what to install or drop) unless a
    `bits`-bit layer of bitsandbytes runs forward and backward on `device` in `compute_dtype`."""
    device = torch.device(device)
    try:
        # lazy: bitsandbytes is optional (the quant extra)
        import bitsandbytes as bnb
    except ImportError as e:
        raise QuantizationUnavailableError(
            f"--bits {bits} needs bitsandbytes: pip install 'exgra-med[quant]' (or drop --bits for a 16-bit LLM)"
        ) from e
    try:
        _probe(bits, device, compute_dtype, quant_type)
    except Exception as e:  # any failure of the probe means this backend cannot train
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise QuantizationUnavailableError(
            f"--bits {bits}: bitsandbytes {bnb.__version__} cannot run {bits}-bit layers on {device.type} "
            f"({compute_dtype}): {reason}. Use a CUDA GPU, bitsandbytes >= 0.50 for CPU, or drop --bits"
        ) from e


def dequantize_bnb_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """(state with every bitsandbytes-quantised weight replaced by its float32 weight, number replaced).

    4-bit: `<m>.weight` (packed) with `<m>.weight.absmax`, `.quant_map`, `.nested_*` and
    `.quant_state.bitsandbytes__nf4|fp4`. 8-bit: int8 `<m>.weight` with its row scales `<m>.SCB` (and
    `<m>.weight_format`). Other tensors pass through unchanged; without quantised weights, `state` is returned as is.
    """
    four_bit = [m["weight"] for m in map(_QUANT_STATE_KEY.match, state) if m]
    eight_bit = [k[: -len("SCB")] + "weight" for k in state if k.endswith(".SCB")]
    if not four_bit and not eight_bit:
        return state, 0
    try:
        # lazy: bitsandbytes is optional (the quant extra)
        import bitsandbytes.functional as bnbf
    except ImportError as e:
        raise QuantizationUnavailableError(
            "these weights are bitsandbytes-quantised (a --bits 4|8 run); dequantising them needs bitsandbytes: "
            "pip install 'exgra-med[quant]'"
        ) from e
    out = dict(state)
    for weight in four_bit:
        companions = {k: out.pop(k) for k in list(out) if k.startswith(weight + ".")}
        quant_state = bnbf.QuantState.from_dict(
            {k[len(weight) + 1:]: v for k, v in companions.items()}, device=torch.device("cpu")
        )
        out[weight] = bnbf.dequantize_4bit(out[weight], quant_state).float()
    for weight in eight_bit:
        module = weight[: -len("weight")]
        scales = out.pop(module + "SCB")
        out.pop(module + "weight_format", None)
        out[weight] = bnbf.int8_vectorwise_dequant(out[weight], scales.float()).float()
    return out, len(four_bit) + len(eight_bit)
