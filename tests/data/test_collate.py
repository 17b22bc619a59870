"""DataCollator: right padding values, masks, stacked images with an image mask."""

from __future__ import annotations

import pytest
import torch

from exgra_med.constants import IGNORE_INDEX
from exgra_med.data.collate import DataCollator, pack_rows


def _item(n, image=True, text=None, rid="x"):
    item = {"id": rid, "input_ids": torch.arange(10, 10 + n), "labels": torch.arange(100, 100 + n)}
    if image:
        item["pixel_values"] = torch.full((3, 4, 4), float(n))
    if text is not None:
        item["response_ids"] = torch.arange(1, 1 + text)
        item["extended_ids"] = torch.arange(1, 2 + text)
    return item


def test_padding_values_and_masks(word_tokenizer):
    pad = word_tokenizer.pad_token_id
    batch = DataCollator(word_tokenizer)([_item(3, text=2, rid="a"), _item(5, text=4, rid="b")])
    assert batch["input_ids"].tolist() == [[10, 11, 12, pad, pad], [10, 11, 12, 13, 14]]
    assert batch["labels"].tolist() == [
        [100, 101, 102, IGNORE_INDEX, IGNORE_INDEX],
        [100, 101, 102, 103, 104],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["ids"] == ["a", "b"]
    assert batch["pixel_values"].shape == (2, 3, 4, 4) and batch["pixel_values"][1, 0, 0, 0] == 5.0
    assert batch["image_mask"].tolist() == [True, True]
    assert batch["response_ids"].tolist() == [[1, 2, pad, pad], [1, 2, 3, 4]]
    assert batch["response_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["extended_ids"].shape == (2, 5) and batch["extended_mask"].sum().item() == 8


def test_mixed_image_and_text_only_items(word_tokenizer):
    batch = DataCollator(word_tokenizer)([_item(2, image=False), _item(4)])
    assert batch["image_mask"].tolist() == [False, True]
    assert batch["pixel_values"].shape == (2, 3, 4, 4)
    assert (batch["pixel_values"][0] == 0).all() and (batch["pixel_values"][1] == 4.0).all()
    assert "response_ids" not in batch


def test_text_only_batch_has_no_images(word_tokenizer):
    batch = DataCollator(word_tokenizer)([_item(2, image=False)])
    assert "pixel_values" not in batch and "image_mask" not in batch


def test_pad_to_multiple_of(word_tokenizer):
    batch = DataCollator(word_tokenizer, pad_to_multiple_of=8)([_item(3, text=2), _item(9, text=1)])
    assert batch["input_ids"].shape == (2, 16) and batch["labels"][0, 3:].eq(IGNORE_INDEX).all()
    assert batch["response_ids"].shape == (2, 8)


def test_inconsistent_batches_raise(word_tokenizer):
    odd = _item(3)
    odd["pixel_values"] = torch.zeros(3, 5, 5)
    with pytest.raises(ValueError, match="differ in shape"):
        DataCollator(word_tokenizer)([_item(2), odd])
    with pytest.raises(ValueError, match="response_ids is present in some items"):
        DataCollator(word_tokenizer)([_item(2, text=1), _item(2)])


def test_padding_free_packs_one_row_with_restarting_positions(word_tokenizer):
    """`one_row` (flash / flex attention), as transformers' DataCollatorWithFlattening: one row, positions from 0 per
    sample, each sample's first label masked (it would be predicted from the previous sample); images and alignment
    texts stay per sample, in order."""
    items = [_item(3, text=2, rid="a"), _item(2, image=False, text=1, rid="b"), _item(4, text=3, rid="c")]
    batch = DataCollator(word_tokenizer, padding_free=True, one_row=True)(items)
    assert "attention_mask" not in batch and batch["ids"] == ["a", "b", "c"]
    assert batch["row_order"].tolist() == [0, 1, 2]
    assert batch["input_ids"].tolist() == [[10, 11, 12, 10, 11, 10, 11, 12, 13]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    x = IGNORE_INDEX
    assert batch["labels"].tolist() == [[x, 101, 102, x, 101, x, 101, 102, 103]]
    assert batch["image_mask"].tolist() == [True, False, True] and batch["pixel_values"].shape == (3, 3, 4, 4)
    padded = DataCollator(word_tokenizer)(items)
    for key in ("response_ids", "response_mask", "extended_ids", "extended_mask", "pixel_values"):
        assert torch.equal(batch[key], padded[key]), key


def test_pack_rows_first_fit_decreasing_within_the_longest_sample():
    assert pack_rows([5, 2, 3, 1, 4]) == [[0], [4, 3], [2, 1]]
    assert pack_rows([5, 2, 3, 1]) == [[0], [2, 1], [3]]
    assert pack_rows([2, 2, 2, 2]) == [[0], [1], [2], [3]]  # never longer than the padded batch
    assert pack_rows([5, 2, 3], one_row=True) == [[0, 1, 2]]


def test_padding_free_rows_with_filler(word_tokenizer):
    """sdpa / eager: rows no longer than the longest sample, the samples in row order, a filler segment (pad tokens,
    positions from 0, labels ignored) topping up a short row."""
    pad, x = word_tokenizer.pad_token_id, IGNORE_INDEX
    items = [_item(5, text=1, rid="a"), _item(2, text=1, rid="b"), _item(3, image=False, text=1, rid="c"),
             _item(1, text=1, rid="d")]
    batch = DataCollator(word_tokenizer, padding_free=True)(items)
    assert batch["row_order"].tolist() == [0, 2, 1, 3]  # rows [a], [c, b], [d]
    assert batch["ids"] == ["a", "b", "c", "d"]  # per-sample fields keep the batch order
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 14], [10, 11, 12, 10, 11], [10, pad, pad, pad, pad]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert batch["labels"].tolist() == [[x, 101, 102, 103, 104], [x, 101, 102, x, 101], [x, x, x, x, x]]
    assert batch["image_mask"].tolist() == [True, True, False, True]
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [5.0, 2.0, 0.0, 1.0]


def test_padding_free_refuses_padding_and_empty_samples(word_tokenizer):
    with pytest.raises(ValueError, match="drop pad_to_multiple_of"):
        DataCollator(word_tokenizer, pad_to_multiple_of=8, padding_free=True)
    with pytest.raises(ValueError, match=r"without tokens \(ids \['e'\]\)"):
        DataCollator(word_tokenizer, padding_free=True)([_item(2), _item(0, rid="e")])
