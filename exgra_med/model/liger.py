"""Liger kernels (`--use_liger_kernel True`) on the LLM inside an ExGra-Med model, or on a transformers-native VLM.

transformers' Trainer applies Liger to the model it trains by `config.model_type`; for this composite model that
type is "exgra_med", which Liger does not know, so the kernels go onto the language model itself
(`apply_liger`): fused RMSNorm, SwiGLU MLP and RoPE, and Liger's forward of the causal LM, which in training
computes the loss with the fused linear cross-entropy (the (tokens x vocabulary) logits are never materialised).
`ExGraMedForConditionalGeneration.forward` hands its labels to that forward, so the LM loss takes the fused path;
its `logits` are then None in training. A native VLM inside `AlignedVLM` (its `base_vlm`) is patched whole by its own
`model_type` (gemma3, llava, qwen2_5_vl, ...: Liger's kernels for its language model and vision encoder). Liger's
kernels are Triton GPU kernels: `check_liger` refuses, in one line, machines without CUDA, a missing liger-kernel and
model types Liger has no kernels for; `apply_liger` refuses a patcher that does not import with the installed
transformers (liger-kernel 0.8.5's Qwen2.5-VL patcher with transformers 5.25).
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import torch

from exgra_med.errors import UserError
from exgra_med.io import read_json
from exgra_med.model.checkpoint import is_exgra_med_checkpoint
from exgra_med.model.reference import is_reference_checkpoint

FLAG = "--use_liger_kernel True"


class LigerUnavailableError(UserError):
    """`--use_liger_kernel` where it cannot run: no CUDA device, liger-kernel missing, or an unsupported LLM."""


def supported_model_types() -> list[str]:
    """The LLM `model_type`s the installed liger-kernel has kernels for."""
    # lazy: liger-kernel is optional (the liger extra)
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return sorted(MODEL_TYPE_TO_APPLY_LIGER_FN)


def llm_model_type(model_path: str | Path) -> str | None:
    """The `model_type` of the LLM in a model folder (a plain LLM, an ExGra-Med checkpoint or a reference-layout
    LLaVA-Med folder), read from its config.json; None when the folder has none."""
    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        return None
    if is_exgra_med_checkpoint(model_path):
        return read_json(config_file)["text_config"]["model_type"]
    if is_reference_checkpoint(model_path):
        return "llama"  # LLaVA-Med v0 / ExGra-Med releases: a LLaMA with a projector
    return read_json(config_file).get("model_type")


def check_liger(device: str | torch.device, model_type: str | None) -> None:
    """Raise LigerUnavailableError (one line) unless Liger can run here: liger-kernel installed, training on a
    CUDA device, and kernels for `model_type` (None: not checked)."""
    try:
        # lazy: liger-kernel is optional (the liger extra)
        import liger_kernel  # noqa: F401
    except ImportError as e:
        raise LigerUnavailableError(f"{FLAG} needs liger-kernel: pip install 'exgra-med[liger]'") from e
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise LigerUnavailableError(
            f"{FLAG} needs a CUDA GPU (Liger's kernels are Triton GPU kernels) and this run trains on "
            f"{torch.device(device).type}; drop the flag on this machine"
        )
    if model_type is not None and model_type not in supported_model_types():
        raise LigerUnavailableError(
            f"{FLAG}: liger-kernel has no kernels for LLM type {model_type!r} "
            f"(it has: {', '.join(supported_model_types())}); drop the flag for this model"
        )


def apply_liger(model: torch.nn.Module, **kernel_config: bool) -> torch.nn.Module:
    """Patch `model` with Liger's kernels, in place: the LLM of an ExGraMedForConditionalGeneration, or the whole VLM
    (`base_vlm`) of an AlignedVLM, either possibly PEFT-wrapped; `kernel_config` switches single kernels (`rope`,
    `rms_norm`, `swiglu`, `fused_linear_cross_entropy`, ...), as transformers' `liger_kernel_config`. Returns the
    patched transformers model."""
    # lazy: liger-kernel is optional (the liger extra)
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    target = getattr(model, "base_vlm", None)  # a native VLM: Liger's patcher for its own model type
    if target is None:
        target = model.language_model
        if hasattr(target, "get_base_model"):  # PEFT: the adapters sit inside the modules Liger patches
            target = target.get_base_model()
    model_type = target.config.model_type
    if model_type not in supported_model_types():
        raise LigerUnavailableError(f"{FLAG}: liger-kernel has no kernels for LLM type {model_type!r}")
    try:
        _apply_liger_kernel_to_instance(model=target, **kernel_config)
    except ImportError as e:  # Liger's patcher for this type names classes the installed transformers lacks

        raise LigerUnavailableError(
            f"{FLAG}: liger-kernel {version('liger-kernel')} cannot patch {model_type!r} models with transformers "
            f"{version('transformers')} ({' '.join(str(e).split())[:160]}); drop the flag or install a liger-kernel "
            "release made for this transformers"
        ) from e
    return target
