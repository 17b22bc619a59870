"""The input embeddings of the image delimiters `<im_start>` / `<im_end>`: initialisation, stage-1 training, and
their place in the stage-1 projector file.

As in the reference: when the tokens are new they start at the mean of the other embedding rows (input and
output); stage 1 trains their two input rows together with the projector (every other row stays bit-identical),
saves them with the projector, and `--pretrain_mm_mlp_adapter` puts them into the stage-2 model.
In the projector file they are `model.embed_tokens.weight`, shape (2, D), `<im_start>` first: the reference's
key, which its own loader accepts as "the new rows".
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

EMBED_KEY = "model.embed_tokens.weight"  # the reference's key in mm_projector.bin


def delimiter_ids(model) -> list[int]:
    """[<im_start> id, <im_end> id] of a model using them, else []."""
    cfg = model.config
    if not cfg.mm_use_im_start_end or cfg.im_start_token_id is None or cfg.im_end_token_id is None:
        return []
    return [int(cfg.im_start_token_id), int(cfg.im_end_token_id)]


@torch.no_grad()
def init_rows_to_mean(model, ids: list[int]) -> None:
    """Set rows `ids` of the input and output embeddings to the mean of the other rows (the reference's
    initialisation of newly added `<im_start>` / `<im_end>`)."""
    for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
        if emb is None or not ids:
            continue
        weight = emb.weight  # (V, D)
        keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        keep[ids] = False
        weight[ids] = weight[keep].float().mean(dim=0, keepdim=True).to(weight.dtype)


def train_only_rows(embedding: nn.Embedding, ids: list[int]) -> torch.utils.hooks.RemovableHandle:
    """Make `embedding.weight` trainable with a gradient that is zero outside rows `ids` (the trainer also keeps
    it out of weight decay, so Adam leaves the other rows exactly as they were)."""
    weight = embedding.weight
    weight.requires_grad_(True)
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)  # (V, 1)
    mask[ids] = 1

    def keep_rows(grad: torch.Tensor) -> torch.Tensor:
        return grad * mask.to(grad.device, grad.dtype)

    return weight.register_hook(keep_rows)


def delimiter_state(model) -> dict[str, torch.Tensor]:
    """The trained delimiter rows for the stage-1 projector file: {EMBED_KEY: (2, D)}, or {} without delimiters."""
    ids = delimiter_ids(model)
    if not ids:
        return {}
    return {EMBED_KEY: model.get_input_embeddings().weight.detach()[ids].clone()}


@torch.no_grad()
def load_delimiter_rows(model, weights: dict[str, torch.Tensor], source: str | Path) -> bool:
    """Copy the delimiter rows of a projector file into `model`'s input embeddings; False when there are none.

    Accepts this project's (2, D) rows and the reference's full `embed_tokens` matrix of the same vocabulary.
    """
    ids = delimiter_ids(model)
    found = [k for k in weights if k.endswith("embed_tokens.weight")]
    if not ids or not found:
        return False
    rows = weights[found[0]]
    weight = model.get_input_embeddings().weight  # (V, D)
    if rows.shape[0] == weight.shape[0] and rows.shape[1:] == weight.shape[1:]:
        rows = rows[ids]
    if tuple(rows.shape) != (len(ids), weight.shape[1]):
        raise ValueError(
            f"{source}: {found[0]} has shape {tuple(rows.shape)}; expected the {len(ids)} <im_start>/<im_end> rows "
            f"({len(ids)}, {weight.shape[1]}) or the whole embedding matrix {tuple(weight.shape)}"
        )
    weight[ids] = rows.to(weight.device, weight.dtype)
    return True
