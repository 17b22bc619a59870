"""Batching `SupervisedDataset` items: right padding, attention masks, stacked images (or one packed row).

Images: when any item of the batch has `pixel_values`, the batch holds `pixel_values` (B, 3, H, W)
with zeros in the rows of text-only items, and `image_mask` (B,) telling which rows are real images
(text-only items have no `<im_patch>` tokens, so the model never uses those zero rows). A batch
without any image has neither key.

Padding-free (`padding_free=True`): `input_ids`, `labels` and `position_ids` are rows (R, C) holding the samples one
after the other (each row as transformers' `DataCollatorWithFlattening` makes it: positions restart at 0 per sample,
each sample's first label is IGNORE_INDEX so that no sample learns to predict the next one's start), and there is no
`attention_mask`; the model confines attention to each sample from the position ids (`exgra_med.model.packing`).
`one_row=True` (flash / flex attention): all samples in one row. Otherwise (sdpa, eager, whose masks are dense):
`pack_rows` packs them into rows no longer than the longest sample, each topped up with a filler segment (pad
tokens, positions from 0, labels IGNORE_INDEX). `row_order` (B,) lists the samples in the order the rows hold them;
images, alignment texts and `ids` keep the batch order and their per-sample layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DataCollatorWithFlattening, PreTrainedTokenizerBase

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


def pack_rows(lengths: Sequence[int], one_row: bool = False) -> list[list[int]]:
    """Rows of sample indices for a padding-free batch: all samples in order in one row (`one_row`), or first-fit
    decreasing into rows no longer than the longest sample (deterministic: ties keep the sample order)."""
    if one_row or len(lengths) <= 1:
        return [list(range(len(lengths)))]
    capacity = max(lengths)
    rows: list[list[int]] = []
    filled: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, used in enumerate(filled):
            if used + lengths[i] <= capacity:
                rows[r].append(i)
                filled[r] += lengths[i]
                break
        else:
            rows.append([i])
            filled.append(lengths[i])
    return rows


def pack_row_tensors(
    items: Sequence[dict[str, torch.Tensor]], row_sizes: Sequence[int], pad_id: int,
    token_keys: Sequence[str] = (), flatten: DataCollatorWithFlattening | None = None,
) -> dict[str, torch.Tensor]:
    """Padding-free rows (R, C) of samples given in row order, `row_sizes[r]` of them in row r: `input_ids`,
    `labels` and `position_ids` as transformers' `DataCollatorWithFlattening` makes a row (positions restarting per
    sample, each sample's first label IGNORE_INDEX), the per-token inputs `token_keys` (0 where a sample has none)
    laid out alike, and each row topped up to the longest with a filler segment (pad tokens, positions from 0, labels
    IGNORE_INDEX, token inputs 0)."""
    flatten = flatten or DataCollatorWithFlattening(return_tensors="pt", separator_id=IGNORE_INDEX)
    rows, start = [], 0
    for size in row_sizes:
        samples = items[start:start + size]
        row = {k: v[0] for k, v in flatten([{"input_ids": x["input_ids"], "labels": x["labels"]}
                                            for x in samples]).items() if k in ("input_ids", "labels", "position_ids")}
        for key in token_keys:
            row[key] = torch.cat([x.get(key, torch.zeros_like(x["input_ids"])) for x in samples])
        rows.append(row)
        start += size
    width = max(len(row["input_ids"]) for row in rows)
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, **dict.fromkeys(token_keys, 0)}
    out: dict[str, list[torch.Tensor]] = {key: [] for key in rows[0]}
    for row in rows:
        tail = width - len(row["input_ids"])  # filler: its own segment, ignored by the loss
        for key, value in row.items():
            pad = torch.arange(tail) if key == "position_ids" else torch.full((tail,), fill[key])
            out[key].append(torch.cat([value, pad.to(value.dtype)]))
    return {key: torch.stack(values) for key, values in out.items()}


class DataCollator:
    """Collate dataset items into a batch; pads with the tokenizer's pad id (labels with IGNORE_INDEX), or packs
    the samples into rows without padding (`padding_free=True`; all in one row with `one_row=True`)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        pad_to_multiple_of: int | None = None,
        padding_free: bool = False,
        one_row: bool = False,
    ) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "the tokenizer has no pad token; call exgra_med.model.tokenizer.prepare_tokenizer first (training does)"
            )
        if padding_free and pad_to_multiple_of:
            raise ValueError("padding_free batches are not padded: drop pad_to_multiple_of")
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_free = padding_free
        self.one_row = one_row
        self._flatten = DataCollatorWithFlattening(return_tensors="pt", separator_id=IGNORE_INDEX)

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Batch: input_ids, labels, attention_mask (B, T) (padding-free: input_ids, labels, position_ids (R, C));
        ids; images and alignment texts if present."""
        if not items:
            raise ValueError("cannot collate an empty batch")
        if self.padding_free:
            empty = [x.get("id") for x in items if len(x["input_ids"]) == 0]
            if empty:
                raise ValueError(f"cannot pack samples without tokens (ids {empty})")
            rows = pack_rows([len(x["input_ids"]) for x in items], self.one_row)
            order = [i for row in rows for i in row]
            batch: dict[str, Any] = self._pack([len(row) for row in rows], [items[i] for i in order])
            batch["row_order"] = torch.tensor(order, dtype=torch.long)
            batch["ids"] = [x.get("id") for x in items]
        else:
            input_ids, attention_mask = pad_right(
                [x["input_ids"] for x in items], self.pad_token_id, self.pad_to_multiple_of
            )
            labels, _ = pad_right([x["labels"] for x in items], IGNORE_INDEX, self.pad_to_multiple_of)
            batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                     "ids": [x.get("id") for x in items]}
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

    def _pack(self, row_sizes: list[int], items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """input_ids, labels, position_ids (R, C) of `items` (in row order), `row_sizes[r]` samples in row r."""
        return pack_row_tensors(items, row_sizes, self.pad_token_id, flatten=self._flatten)
