"""`AlignmentHead`: the ExGra-Med alignment (METHOD section 4) for any causal language model, given its image
features.

Every model of the project uses this one head (`ExGraMedForConditionalGeneration`, `AlignedVLM`), and any training
loop can use it as it uses open_clip's losses: the head owns no model, it is given the image features of a batch, the
tokenized alignment texts (the response and the extended caption of each sample, METHOD section 3) and the language
model to encode them with, and returns the alignment loss to add to the LM loss:

    objective = build_alignment_loss(config, hidden_size)  # the trainable graph objective (an nn.Module)
    model.alignment = objective                            # registered on the model that trains, to be optimised
    head = AlignmentHead(objective, config)
    out = head(image_tokens, AlignmentTexts.from_batch(batch), language_model)
    loss = lm_loss + config.alpha * out.loss               # out.parts: the objective's parts by name

`image_tokens` (B, N, D): each sample's image features after the projector (N = 1 for a pooled feature); the
multi-graph objective pools them to one node per sample. `language_model` is any transformers model with
`get_decoder()` (the decoder whose last hidden states are the `after_de` text features), `get_input_embeddings()`
and a config: a causal LM, or a whole VLM (its text config is read).

The text pass: one extra pass of the decoder over both texts of every sample (`encode_text_pairs`: the two texts
side by side in one row with a block-causal mask under sdpa / eager attention, else the 2B texts right padded), or,
in a padding-free batch with a padding-ignoring objective, the texts packed into rows (`encode_packed_texts`).
Without `after_de` the texts are their input embeddings. Pooling is the mean over tokens, padding included unless
`masked_mean` (the reference's mean counts the padding).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from exgra_med.align.config import AlignmentConfig, build_alignment_loss
from exgra_med.model.packing import block_causal_mask, decoder_positions, pack_texts, packs_in_one_row

if TYPE_CHECKING:
    from exgra_med.align.loss import AlignmentOutput
    from exgra_med.model.packing import PackedTexts

__all__ = ["AlignmentHead", "AlignmentTexts", "sample_image_features"]


@dataclass
class AlignmentTexts:
    """The tokenized alignment texts of a batch, right padded: the response (B, T1) and the extended caption
    (B, T2; multi-graph only), each with its 0/1 mask."""

    response_ids: torch.Tensor
    response_mask: torch.Tensor
    extended_ids: torch.Tensor | None = None
    extended_mask: torch.Tensor | None = None

    @classmethod
    def from_batch(cls, batch: Mapping) -> AlignmentTexts | None:
        """The texts of a collated batch (keys `response_ids`, `response_mask`, `extended_ids`, `extended_mask`),
        None when it holds none."""
        if batch.get("response_ids") is None:
            return None
        return cls(batch["response_ids"], batch["response_mask"], batch.get("extended_ids"),
                   batch.get("extended_mask"))


def sample_image_features(features, images_per_sample: list[int]) -> torch.Tensor:
    """(B, 1, D): each sample's image features after the projector, the mean over the tokens of all its images, from
    a VLM's per-image features (`image_outputs.pooler_output` of transformers' VLMs: a tuple of (N_i, D), or an
    (images, N, D) tensor) and the number of images of each sample, in order."""
    per_image = list(features) if isinstance(features, (list, tuple)) else list(features.unbind(0))
    counts = [int(c) for c in images_per_sample]
    if not counts or min(counts) < 1 or sum(counts) != len(per_image):
        raise ValueError(f"the alignment needs at least one image per sample: images per sample {counts}, "
                         f"{len(per_image)} image feature sets from the model")
    nodes, start = [], 0
    for n in counts:
        nodes.append(torch.cat([f.reshape(-1, f.shape[-1]) for f in per_image[start:start + n]]).mean(0))
        start += n
    return torch.stack(nodes)[:, None]


def _pad_right(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    if x.shape[1] == length:
        return x
    return torch.cat([x, x.new_full((x.shape[0], length - x.shape[1]), value)], dim=1)


class AlignmentHead:
    """The alignment objective `objective` (built by `build_alignment_loss(config, D)`) over a language model's text
    features; see the module docstring. It holds no parameters of its own: the objective's are the model's."""

    def __init__(self, objective: nn.Module, config: AlignmentConfig):
        self.objective = objective
        self.config = config

    @classmethod
    def build(cls, config: AlignmentConfig, hidden_size: int) -> AlignmentHead | None:
        """A head with a fresh objective for D = `hidden_size` features; None when the alignment is off."""
        objective = build_alignment_loss(config, hidden_size)
        return None if objective is None else cls(objective, config)

    # --- the text pass -------------------------------------------------------------------------------------
    @staticmethod
    def _text_config(language_model: nn.Module):
        config = language_model.config
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    def encode_texts(self, language_model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token features of texts (B, T, D): the decoder's last hidden states (`after_de`) or the input embeddings."""
        if self.config.after_de:
            return language_model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        return language_model.get_input_embeddings()(ids)

    def encode_text_pairs(self, language_model: nn.Module, ids1: torch.Tensor, mask1: torch.Tensor,
                          ids2: torch.Tensor, mask2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token features of two texts per sample, (B, T1, D) and (B, T2, D), from ONE extra decoder pass.

        Equal (up to rounding) to `encode_texts` on each text separately (the reference's two passes):
        - sdpa / eager attention (and no sliding window shorter than a text): sample i's two texts side by side in
          one row of length T1 + T2, positions restarting at the second text and a block-causal mask (each token
          sees the non-padding tokens of its own text up to itself, as in a separate pass);
        - otherwise (flash attention takes no custom mask): the 2B texts right padded to max(T1, T2); causal
          attention leaves the positions < T of each text unchanged.
        """
        t1, t2 = ids1.shape[1], ids2.shape[1]
        if not self.config.after_de:
            return self.encode_texts(language_model, ids1, mask1), self.encode_texts(language_model, ids2, mask2)
        text_config = self._text_config(language_model)
        impl = getattr(text_config, "_attn_implementation", None)
        window = getattr(text_config, "sliding_window", None)
        if impl in ("sdpa", "eager") and (window is None or window >= max(t1, t2)):
            ids = torch.cat([ids1, ids2], dim=1)  # (B, T1 + T2)
            mask, positions = block_causal_mask(mask1, mask2, impl, language_model.get_input_embeddings().weight.dtype)
            hidden = language_model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions,
                                                  use_cache=False).last_hidden_state
            return hidden[:, :t1], hidden[:, t1:]
        b, t = ids1.shape[0], max(t1, t2)
        pad_id = text_config.pad_token_id or 0
        ids = torch.cat([_pad_right(ids1, t, pad_id), _pad_right(ids2, t, pad_id)])  # (2B, T)
        mask = torch.cat([_pad_right(mask1, t, 0), _pad_right(mask2, t, 0)])
        hidden = self.encode_texts(language_model, ids, mask)  # (2B, T, D)
        return hidden[:b, :t1], hidden[b:, :t2]

    def encode_packed_texts(self, language_model: nn.Module, ids: torch.Tensor,
                            mask: torch.Tensor) -> tuple[torch.Tensor, PackedTexts]:
        """Decoder last hidden states of right-padded texts (N, T) computed padding-free: the texts packed into rows
        with positions restarting per text (`exgra_med.model.packing.pack_texts`), so that transformers confines
        attention to each text. Returns the packed features (R, C, D) and the layout to pool or unpack them."""
        text_config = self._text_config(language_model)
        one_row = packs_in_one_row(getattr(text_config, "_attn_implementation", None))
        packed = pack_texts(ids, mask, one_row, fill_value=text_config.pad_token_id or 0)
        positions = decoder_positions(text_config, packed.position_ids)  # (4, R, C) under multimodal RoPE
        hidden = language_model.get_decoder()(input_ids=packed.ids, position_ids=positions,
                                              use_cache=False).last_hidden_state
        return hidden, packed

    # --- the loss --------------------------------------------------------------------------------------------
    def __call__(self, image_tokens: torch.Tensor, texts: AlignmentTexts, language_model: nn.Module,
                 packed: bool = False) -> AlignmentOutput:
        """The configured objective over image features (B, N, D), the response and (multi-graph) extended texts.

        `packed` (a padding-free batch): the `after_de` text pass runs padding-free as well whenever the objective
        ignores padding (masked text means, the contrastive ablations); the reference's unmasked mean averages the
        padding positions' states too, so it keeps the padded pass.
        """
        # lazy: align.loss imports torch_geometric (seconds), which a command that only loads a model never needs
        from exgra_med.align.loss import pool_tokens

        if image_tokens.dim() != 3:
            raise ValueError(f"image features must be (B, N, D), got shape {tuple(image_tokens.shape)}")
        options = self.config
        packed_texts = packed and options.after_de
        if not options.multi_graph:  # the contrastive ablations: image tokens against response tokens
            if packed_texts:
                hidden, layout = self.encode_packed_texts(language_model, texts.response_ids, texts.response_mask)
                text = layout.unpacked(hidden, tuple(texts.response_ids.shape))  # (B, T, D), zeros at padding
            else:
                text = self.encode_texts(language_model, texts.response_ids, texts.response_mask)
            return self.objective(image_tokens, text, texts.response_mask)
        if texts.extended_ids is None:
            raise ValueError("multi_graph alignment needs extended_ids (records need `conversations_long`)")
        image = image_tokens.mean(dim=1)  # (B, D)
        if packed_texts and options.masked_mean:
            b = texts.response_ids.shape[0]
            t = max(texts.response_ids.shape[1], texts.extended_ids.shape[1])
            ids = torch.cat([_pad_right(texts.response_ids, t, 0), _pad_right(texts.extended_ids, t, 0)])  # (2B, T)
            mask = torch.cat([_pad_right(texts.response_mask, t, 0), _pad_right(texts.extended_mask, t, 0)])
            hidden, layout = self.encode_packed_texts(language_model, ids, mask)  # each text attends to itself only
            pooled = layout.pooled(hidden, 2 * b)  # (2B, D): masked means
            return self.objective(image, pooled[:b].to(image.dtype), pooled[b:].to(image.dtype))
        response_hidden, extended_hidden = self.encode_text_pairs(
            language_model, texts.response_ids, texts.response_mask, texts.extended_ids, texts.extended_mask
        )
        response = pool_tokens(response_hidden, texts.response_mask, masked=options.masked_mean)  # (B, D)
        extended = pool_tokens(extended_hidden, texts.extended_mask, masked=options.masked_mean)  # (B, D)
        return self.objective(image, response.to(image.dtype), extended.to(image.dtype))
