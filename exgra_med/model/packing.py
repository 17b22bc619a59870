"""Padding-free ("packed") batches: the samples of a micro-batch side by side in rows, without padding.

A packed row holds samples one after the other, with `position_ids` that restart at 0 at each sample and no
attention mask. transformers then confines attention to each sample by itself: flash-attention takes its varlen
path from the position ids, and sdpa / eager / flex attention get a block-diagonal causal mask from
`transformers.masking_utils` (`find_packed_sequence_indices`).

How many rows: flash-attention's varlen path and flex attention's block mask skip the other samples' keys, so all
samples go into ONE row (flash-attention reads packed samples from one row only). sdpa and eager compute the whole
(L, L) mask of a row, so one row of a micro-batch would cost L^2 attention, far more than the padded batch; there the
samples are packed first-fit-decreasing into rows no longer than the longest sample, each row topped up with a
filler segment (pad tokens, labels ignored, attending only to themselves). `exgra_med.data.collate.pack_rows` plans
the rows; this module holds the helpers the model needs around that layout and the check that an LLM can take it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from exgra_med.data.collate import pack_rows
from exgra_med.errors import UserError

# Attention implementations whose packed path transformers implements (masking_utils / flash varlen).
PACKED_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
# Those that skip the keys of other samples: all samples in one row (flash-attention requires it).
ONE_ROW_ATTENTION = ("flex_attention", "flash_attention_2", "flash_attention_3")
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


def packs_in_one_row(attn_implementation: str | None) -> bool:
    """Whether padding-free batches for this attention implementation hold all samples in one row."""
    return attn_implementation in ONE_ROW_ATTENTION


def is_packed(position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> bool:
    """Whether a batch is in the packed layout: explicit position ids and no attention mask."""
    return position_ids is not None and attention_mask is None


def segment_index(position_ids: torch.Tensor) -> torch.Tensor:
    """(R, C) packed position ids, restarting at 0 per segment -> (R * C,) index of the segment of each token, in
    row-major order. Segments are the samples and the fillers that top rows up."""
    if position_ids.dim() != 2:
        raise ValueError(f"packed position_ids must have shape (rows, length), got {tuple(position_ids.shape)}")
    if position_ids.shape[1] and bool((position_ids[:, 0] != 0).any()):
        raise ValueError("every row of packed position_ids must start at 0 (a sample's first token)")
    return (position_ids.flatten() == 0).cumsum(0) - 1


def images_in_row_order(
    pixel_values: torch.Tensor, image_mask: torch.Tensor | None, row_order: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image per sample (B, 3, H, W) in batch order, `image_mask` (B,) marking the real ones (None: all) ->
    the images and mask in `row_order`, and the batch index of each real image in row order (argsort of it puts
    image features back in batch order)."""
    if pixel_values.shape[0] != row_order.shape[0]:
        raise ValueError(f"row_order lists {row_order.shape[0]} samples but pixel_values holds "
                         f"{pixel_values.shape[0]} images; give one per sample (image_mask marks the real ones)")
    has_image = image_mask if image_mask is not None else torch.ones_like(row_order, dtype=torch.bool)
    return pixel_values[row_order], has_image[row_order], row_order[has_image[row_order]]


def segment_mean(hidden: torch.Tensor, segments: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Mean over the tokens of each segment: (L, D) features, (L,) segment index -> (num_segments, D) in float32
    (zeros for a segment without tokens). Equal to `pool_tokens(padded, mask, masked=True)` of the same texts."""
    hidden = hidden.float()
    sums = hidden.new_zeros(num_segments, hidden.shape[-1]).index_add_(0, segments, hidden)
    counts = torch.bincount(segments, minlength=num_segments).clamp_min(1).to(hidden.dtype)
    return sums / counts[:, None]  # (num_segments, D)


@dataclass
class PackedTexts:
    """Right-padded texts (N, T) packed into rows: `ids` and `position_ids` (R, C); `owner` and `position` (R * C,)
    tell, for each token in row-major order, which text and which position of it it is (owner -1: filler)."""

    ids: torch.Tensor
    position_ids: torch.Tensor
    owner: torch.Tensor
    position: torch.Tensor

    def pooled(self, hidden: torch.Tensor, num_texts: int) -> torch.Tensor:
        """Per-text mean of the packed features (R, C, D) over each text's tokens -> (num_texts, D), float32."""
        keep = self.owner >= 0
        return segment_mean(hidden.flatten(0, 1)[keep], self.owner[keep], num_texts)

    def unpacked(self, hidden: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """The packed features (R, C, D) back in the padded layout (N, T, D), zeros at padding positions."""
        keep = self.owner >= 0
        flat = hidden.flatten(0, 1)
        out = flat.new_zeros(*shape, flat.shape[-1])
        out[self.owner[keep], self.position[keep]] = flat[keep]
        return out


def pack_texts(ids: torch.Tensor, mask: torch.Tensor, one_row: bool, fill_value: int = 0) -> PackedTexts:
    """Pack right-padded texts (N, T) with their 0/1 mask into rows (`pack_rows`; one row when `one_row`)."""
    lengths = mask.sum(1).tolist()
    rows = pack_rows(lengths, one_row)
    width = max(sum(lengths[i] for i in row) for row in rows)
    owner, position = [], []
    for row in rows:
        for i in row:
            owner += [i] * lengths[i]
            position += range(lengths[i])
        tail = width - sum(lengths[i] for i in row)
        owner += [-1] * tail
        position += range(tail)
    owner_t = torch.tensor(owner, dtype=torch.long, device=ids.device)
    position_t = torch.tensor(position, dtype=torch.long, device=ids.device)
    keep = owner_t >= 0
    flat = torch.full_like(owner_t, fill_value, dtype=ids.dtype)
    flat[keep] = ids[owner_t[keep], position_t[keep]]
    return PackedTexts(flat.view(len(rows), width), position_t.view(len(rows), width), owner_t, position_t)


def block_causal_mask(mask1: torch.Tensor, mask2: torch.Tensor, impl: str,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(4D attention mask (B, 1, L, L), position ids (B, L)) of two texts per row, L = T1 + T2: each token sees the
    non-padding tokens of its own text up to itself; positions restart at the second text. sdpa takes the boolean
    mask (True = attend), eager an additive one."""
    t1, t2, dev = mask1.shape[1], mask2.shape[1], mask1.device
    positions = torch.cat([torch.arange(t1, device=dev), torch.arange(t2, device=dev)])
    segment = torch.cat([torch.zeros(t1, device=dev, dtype=torch.long), torch.ones(t2, device=dev, dtype=torch.long)])
    causal = (segment[:, None] == segment[None, :]) & (positions[None, :] <= positions[:, None])  # (L, L)
    keys = torch.cat([mask1, mask2], dim=1).bool()  # (B, L)
    allowed = causal[None] & keys[:, None, :]  # (B, L queries, L keys)
    # A query with no visible key (a text that starts with padding) attends to itself: finite, unused.
    allowed = allowed | (torch.eye(t1 + t2, device=dev, dtype=torch.bool)[None] & ~allowed.any(dim=2, keepdim=True))
    mask = allowed[:, None]
    if impl == "eager":
        mask = torch.zeros(mask.shape, device=dev, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)
    return mask, positions.expand(mask1.shape[0], -1)


def packed_rope_positions(rope_index, input_ids: torch.Tensor, position_ids: torch.Tensor,
                          mm_token_type_ids: torch.Tensor, image_grid_thw: torch.Tensor | None) -> torch.Tensor:
    """Multimodal RoPE positions of a packed batch (Qwen2-VL family): (R, C) ids, restarting positions and token types
    -> (4, R, C), the text positions followed by the (3, R, C) temporal / height / width positions that the model's
    `rope_index` (`get_rope_index`) gives each segment alone. transformers' Qwen2-VL family reads this 4-row form in
    packed batches: the first row tells the attention mask where the samples start."""
    if bool((mm_token_type_ids > 1).any()):
        raise ValueError("padding-free batches with videos are not supported (mm_token_type_ids 2)")
    is_image = mm_token_type_ids == 1
    image_starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]  # (R, C): first token of each image
    positions = position_ids.new_zeros((3, *position_ids.shape))
    used, width = 0, position_ids.shape[1]
    for r in range(position_ids.shape[0]):
        starts = (position_ids[r] == 0).nonzero().flatten().tolist() + [width]
        for s, e in zip(starts[:-1], starts[1:]):
            n = int(image_starts[r, s:e].sum())
            grid = image_grid_thw[used:used + n] if n else None
            used += n
            segment = rope_index(input_ids[r:r + 1, s:e], mm_token_type_ids=mm_token_type_ids[r:r + 1, s:e],
                                 image_grid_thw=grid)[0]  # (3, 1, e - s)
            positions[:, r, s:e] = segment[:, 0]
    if used != (0 if image_grid_thw is None else image_grid_thw.shape[0]):
        raise ValueError(f"the packed rows hold {used} images but image_grid_thw lists "
                         f"{0 if image_grid_thw is None else image_grid_thw.shape[0]}")
    return torch.cat([position_ids[None], positions])  # (4, R, C)


# Text decoders with multimodal RoPE (the Qwen2-VL family): they read packed samples from (4, R, C) positions whose
# first row holds the restarting text positions; given (R, C) positions they would attend across the samples of a row.
MROPE_TEXT_MODELS = ("qwen2_vl_text", "qwen2_5_vl_text")


def decoder_positions(text_config, position_ids: torch.Tensor) -> torch.Tensor:
    """Restarting (R, C) positions of text-only packed rows in the form `text_config`'s decoder reads them: (4, R, C)
    under multimodal RoPE (text = temporal = height = width positions for text), else as they are."""
    if getattr(text_config, "model_type", None) in MROPE_TEXT_MODELS:
        return position_ids[None].expand(4, -1, -1)
    return position_ids


# Native VLM architectures (model_type) whose padding-free batches give the padded batches' LM and alignment losses
# and weights (tests/vlm/test_vlm_padding_free.py); `exgra_med.model.native.aligned.AlignedVLM` feeds them packed rows.
PACKED_NATIVE_VLMS = ("llava_onevision", "qwen2_5_vl")
# Native VLM architectures that cannot pack, and why.
UNPACKABLE_NATIVE_VLMS = {
    "gemma3": "Gemma 3's sliding-window layers attend bidirectionally within each image, and transformers looks those "
              "image blocks up by the position inside each packed sample instead of the token's place in the row "
              "(packed losses differ from padded ones)",
}


def check_native_padding_free(config: PretrainedConfig, attn_implementation: str | None = None) -> None:
    """Raise `PaddingFreeError` unless the native VLM that `config` describes trains padding-free as it does padded
    (checked from the config alone, before any weights are loaded)."""
    model_type = getattr(config, "model_type", "?")
    if model_type in UNPACKABLE_NATIVE_VLMS:
        raise PaddingFreeError(f"--padding_free True: {UNPACKABLE_NATIVE_VLMS[model_type]}; train {model_type} padded")
    if model_type not in PACKED_NATIVE_VLMS:
        raise PaddingFreeError(f"--padding_free True: padding-free batches are verified on the native VLMs "
                               f"{', '.join(PACKED_NATIVE_VLMS)} only, not {model_type!r}; train it padded")
    attn = attn_implementation or getattr(config, "_attn_implementation", None) or "sdpa"
    text_config = config.get_text_config()

    if type(text_config) in MODEL_FOR_CAUSAL_LM_MAPPING:  # a language model of its own (LLaVA-OneVision's Qwen2)
        check_padding_free(text_config, attn)
    else:
        check_attention_packs(attn)
