"""Batching `SupervisedDataset` items: right padding, attention masks, stacked images.

Images: when any item of the batch has `pixel_values`, the batch holds `pixel_values` (B, 3, H, W)
with zeros in the rows of text-only items, and `image_mask` (B,) telling which rows are real images
(text-only items have no `<im_patch>` tokens, so the model never uses those zero rows). A batch
without any image has neither key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from exgra_med.constants import IGNORE_INDEX

# Optional text fields of an item -> name of their mask in the batch.
_TEXT_FIELDS = {"response_ids": "response_mask", "extended_ids": "extended_mask"}


def pad_right(
    seqs: Sequence[torch.Tensor], value: int, pad_to_multiple_of: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D tensors to a (B, T) tensor; returns it and the (B, T) 0/1 mask of real tokens."""
    length = max(len(s) for s in seqs)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return out, mask


class DataCollator:
    """Collate dataset items into a batch; pads with the tokenizer's pad id (labels with IGNORE_INDEX)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "the tokenizer has no pad token; call exgra_med.model.tokenizer.prepare_tokenizer first (training does)"
            )
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Batch: input_ids, labels, attention_mask (B, T); ids; images and alignment texts if present."""
        if not items:
            raise ValueError("cannot collate an empty batch")
        input_ids, attention_mask = pad_right(
            [x["input_ids"] for x in items], self.pad_token_id, self.pad_to_multiple_of
        )
        labels, _ = pad_right([x["labels"] for x in items], IGNORE_INDEX, self.pad_to_multiple_of)
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "ids": [x.get("id") for x in items],
        }
        with_image = [x.get("pixel_values") is not None for x in items]
        if any(with_image):
            shapes = {tuple(x["pixel_values"].shape) for x, has in zip(items, with_image) if has}
            if len(shapes) != 1:
                raise ValueError(
                    f"images of one batch differ in shape: {sorted(shapes)} (ids {batch['ids']})"
                )
            shape = shapes.pop()
            reference = next(x["pixel_values"] for x, has in zip(items, with_image) if has)
            pixel_values = torch.zeros((len(items), *shape), dtype=reference.dtype)  # (B, 3, H, W)
            for i, (x, has) in enumerate(zip(items, with_image)):
                if has:
                    pixel_values[i] = x["pixel_values"]
            batch["pixel_values"] = pixel_values
            batch["image_mask"] = torch.tensor(with_image, dtype=torch.bool)
        for key, mask_key in _TEXT_FIELDS.items():
            present = [key in x for x in items]
            if any(present) and not all(present):
                raise ValueError(
                    f"{key} is present in some items of the batch but not all (ids {batch['ids']})"
                )
            if all(present):
                batch[key], batch[mask_key] = pad_right(
                    [x[key] for x in items], self.pad_token_id, self.pad_to_multiple_of
                )
        return batch
