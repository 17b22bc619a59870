"""Padding-free ("packed") batches: the samples of a micro-batch side by side in ONE row.

A packed row holds the samples one after the other, with `position_ids` that restart at 0 at each sample and no
attention mask. transformers then confines attention to each sample by itself: flash-attention takes its varlen
path from the position ids, and sdpa / eager / flex attention get a block-diagonal causal mask from
`transformers.masking_utils` (`find_packed_sequence_indices`). This module holds the helpers around that layout
(segments, per-sample means, flattening padded texts) and the check that a language model can take it.
"""

from __future__ import annotations

import importlib

import torch
from transformers import PretrainedConfig

from exgra_med.errors import UserError

# Attention implementations whose packed path transformers implements (masking_utils / flash varlen).
PACKED_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
# Layer kinds that attend through the mask built from the position ids (recurrent or linear layers would carry
# state from one sample into the next).
_ATTENTION_LAYERS = ("full_attention", "sliding_attention")
_MASK_BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask")


class PaddingFreeError(UserError):
    """The language model or its attention implementation cannot run padding-free batches."""


def check_attention_packs(attn_implementation: str) -> None:
    """Raise `PaddingFreeError` unless transformers confines this attention implementation to each packed sample."""
    if attn_implementation not in PACKED_ATTENTION:
        raise PaddingFreeError(
            f"--padding_free True needs --attn_implementation in {PACKED_ATTENTION}; got {attn_implementation!r}"
        )


def check_padding_free(text_config: PretrainedConfig, attn_implementation: str | None = None) -> None:
    """Raise `PaddingFreeError` unless the causal LM that `text_config` describes confines attention to each sample
    of a packed row (checked from the config alone, before any weights are loaded)."""
    check_attention_packs(attn_implementation or getattr(text_config, "_attn_implementation", None) or "sdpa")
    model_type = getattr(text_config, "model_type", "?")
    layer_types = set(getattr(text_config, "layer_types", None) or ())
    if layer_types - set(_ATTENTION_LAYERS):
        raise PaddingFreeError(
            f"--padding_free True: the {model_type} LLM has {sorted(layer_types - set(_ATTENTION_LAYERS))} layers, "
            "which would carry state from one packed sample into the next; train it padded"
        )
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(text_config)]
    except KeyError:
        raise PaddingFreeError(
            f"--padding_free True: no transformers causal-LM class for model type {model_type!r}; train it padded"
        ) from None
    module = importlib.import_module(model_class.__module__)
    if not any(hasattr(module, name) for name in _MASK_BUILDERS):
        raise PaddingFreeError(
            f"--padding_free True: {model_class.__name__} does not build its attention masks through "
            "transformers.masking_utils, so it would not see the sample boundaries of a packed row; train it padded"
        )


def is_packed(position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> bool:
    """Whether a batch is in the packed layout: one row, explicit position ids and no attention mask."""
    return position_ids is not None and attention_mask is None and position_ids.shape[0] == 1


def segment_index(position_ids: torch.Tensor) -> torch.Tensor:
    """(1, L) position ids restarting at 0 per sample -> (L,) index of the sample each token belongs to."""
    if position_ids.dim() != 2 or position_ids.shape[0] != 1:
        raise ValueError(f"packed position_ids must have shape (1, L), got {tuple(position_ids.shape)}")
    if position_ids.shape[1] and int(position_ids[0, 0]) != 0:
        raise ValueError("packed position_ids must start at 0 (a sample's first token)")
    return (position_ids[0] == 0).cumsum(0) - 1


def segment_mean(hidden: torch.Tensor, segments: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Mean over the tokens of each sample: (L, D) features, (L,) sample index -> (num_segments, D) in float32.

    Equal to `pool_tokens(padded, mask, masked=True)` of the same samples padded.
    """
    hidden = hidden.float()
    sums = hidden.new_zeros(num_segments, hidden.shape[-1]).index_add_(0, segments, hidden)
    counts = torch.bincount(segments, minlength=num_segments).clamp_min(1).to(hidden.dtype)
    return sums / counts[:, None]  # (num_segments, D)


def flatten_padded(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and their 0/1 mask -> the packed row (1, L), its position ids (1, L) and the (L,)
    index of the row each token comes from (a row without tokens simply has none)."""
    keep = mask.bool()
    positions = (keep.long().cumsum(1) - 1)[keep]  # restarts at 0 in every row
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(keep)[keep]
    return ids[keep].unsqueeze(0), positions.unsqueeze(0), rows


def unflatten(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Inverse of `flatten_padded` for features: (L, D) -> (B, T, D), zeros at the padding positions of `mask`."""
    out = hidden.new_zeros(*mask.shape, hidden.shape[-1])
    out[mask.bool()] = hidden
    return out
