"""Lazy supervised dataset: a record -> input_ids / labels (+ pixel values, + alignment text ids).

Labels follow METHOD section 2: the conversation is rendered with a prompt template (`llava_med` by
default) and every token outside the template's target segments (assistant turns and the "###"
separators that end them) is IGNORE_INDEX. The text is tokenized once; each token is mapped back
to its characters through the tokenizer's offsets, so the mask always matches the real
tokenization. A token that straddles a target / non-target boundary is a tokenization mismatch and
raises; so does a record whose labels end up fully masked. Nothing is skipped silently.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from exgra_med.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_PATCH_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    GPT,
    IGNORE_INDEX,
)
from exgra_med.conversation import Segment, get_template
from exgra_med.data.images import (
    DEFAULT_ASPECT_RATIO,
    ImageLoadError,
    ImageProcessor,
    load_image,
    preprocess_image,
)
from exgra_med.data.records import RecordError, load_records, record_label

logger = logging.getLogger(__name__)

ALIGNMENT_SEPARATOR = ". "
_IMAGE_TOKENS = (DEFAULT_IMAGE_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN)


class TokenizationMismatchError(RecordError):
    """The target mask computed from the template disagrees with how the tokenizer split the text."""


def image_placeholder(num_image_tokens: int, mm_use_im_start_end: bool) -> str:
    """The text that replaces `<image>`: N x `<im_patch>`, wrapped in `<im_start>`/`<im_end>` if asked."""
    patches = DEFAULT_IMAGE_PATCH_TOKEN * num_image_tokens
    return f"{DEFAULT_IM_START_TOKEN}{patches}{DEFAULT_IM_END_TOKEN}" if mm_use_im_start_end else patches


def alignment_text(turns: Sequence[dict]) -> str:
    """METHOD section 3: all gpt values, newlines and image tokens removed, joined by ". "."""
    answers = []
    for turn in turns:
        if turn["from"] != GPT:
            continue
        value = turn["value"].replace("\n", "")
        for token in _IMAGE_TOKENS:
            value = value.replace(token, "")
        answers.append(value)
    return ALIGNMENT_SEPARATOR.join(answers)


def tokenize_segments(
    segments: Sequence[Segment], tokenizer: PreTrainedTokenizerBase, where: str = "conversation",
    add_special_tokens: bool = True,
) -> tuple[list[int], list[int]]:
    """Tokenize the joined segments once; label each token by the segment its characters fall in.

    Tokens without characters (BOS, EOS added by the tokenizer) are masked; `add_special_tokens=False` for text that
    already holds them (a chat template's rendering). Raises `TokenizationMismatchError` (naming `where`) when a token
    covers target and non-target text.
    """
    text = "".join(s.text for s in segments)
    is_target = np.zeros(len(text), dtype=bool)
    pos = 0
    for seg in segments:
        is_target[pos : pos + len(seg.text)] = seg.target
        pos += len(seg.text)
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    labels = []
    for token_id, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        if not 0 <= start <= end <= len(text):
            raise TokenizationMismatchError(
                f"{where}: token {token_id} has offsets ({start}, {end}) outside the text"
            )
        flags = is_target[start:end]
        if flags.all() and end > start:
            labels.append(token_id)
        elif not flags.any():
            labels.append(IGNORE_INDEX)
        else:
            raise TokenizationMismatchError(
                f"{where}: tokenization mismatch: token {tokenizer.convert_ids_to_tokens(token_id)!r} "
                f"covers both prompt and answer text {text[start:end]!r}; the label mask cannot follow it"
            )
    return list(enc["input_ids"]), labels


class SupervisedDataset(Dataset):
    """Records from `data_path`, tokenized and their images loaded lazily in `__getitem__`.

    An item holds `id`, `input_ids` (T,), `labels` (T,), `pixel_values` (3, H, W) when the record has
    an image, and with `alignment=True` the ids of the response and extended texts (METHOD section 3).
    """

    def __init__(
        self,
        data_path: str | os.PathLike,
        image_folder: str | os.PathLike | None,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: ImageProcessor | None,
        num_image_tokens: int,
        mm_use_im_start_end: bool,
        template: str = "llava_med",
        image_aspect_ratio: str = DEFAULT_ASPECT_RATIO,
        max_length: int = 2048,
        alignment: bool = False,
        records: list[dict] | None = None,
    ) -> None:
        """`records`: the already validated records of `data_path` (`load_records`), to skip reading it again."""
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError(
                "SupervisedDataset needs a fast tokenizer (it uses offset mappings for the labels)"
            )
        patch_id = tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_PATCH_TOKEN)
        if patch_id is None or patch_id == tokenizer.unk_token_id:
            raise ValueError(
                f"the tokenizer has no {DEFAULT_IMAGE_PATCH_TOKEN} token; call "
                "exgra_med.model.tokenizer.prepare_tokenizer(tokenizer, mm_use_im_start_end) first (training does)"
            )
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be positive, got {num_image_tokens}")
        self.data_path = str(data_path)
        self.records = records if records is not None else load_records(data_path, require_long=alignment)
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_image_tokens = num_image_tokens
        self.mm_use_im_start_end = mm_use_im_start_end
        self.template = get_template(template)
        self.image_aspect_ratio = image_aspect_ratio
        self.max_length = max_length
        self.alignment = alignment
        self.patch_token_id = patch_id
        n_images = sum("image" in r for r in self.records)
        if n_images and (self.image_folder is None or image_processor is None):
            raise ValueError(
                f"{self.data_path}: {n_images} records have images but no image_folder / processor was given"
            )
        logger.info("%s: %d records (%d with images)", self.data_path, len(self.records), n_images)

    def __len__(self) -> int:
        return len(self.records)

    def _where(self, index: int) -> str:
        return f"{self.data_path}: {record_label(self.records[index], index)}"

    def _load_pixels(self, index: int) -> torch.Tensor:
        path = self.image_folder / self.records[index]["image"]
        try:
            img = load_image(path)
        except ImageLoadError as e:
            raise ImageLoadError(f"{self._where(index)}: {e}") from e
        return preprocess_image(img, self.image_processor, self.image_aspect_ratio)

    def encode(self, index: int) -> dict[str, Any]:
        """input_ids / labels (lists) of record `index`, after the image placeholder and truncation."""
        record, where = self.records[index], self._where(index)
        turns = copy.deepcopy(record["conversations"])
        has_image = "image" in record
        if has_image:
            placeholder = image_placeholder(self.num_image_tokens, self.mm_use_im_start_end)
            turns[0]["value"] = turns[0]["value"].replace(DEFAULT_IMAGE_TOKEN, placeholder)
        segments = self.template.segments([(t["from"], t["value"]) for t in turns])
        input_ids, labels = tokenize_segments(segments, self.tokenizer, where)
        input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        n_patches = sum(1 for t in input_ids if t == self.patch_token_id)
        if n_patches != (self.num_image_tokens if has_image else 0):
            raise RecordError(
                f"{where}: found {n_patches} {DEFAULT_IMAGE_PATCH_TOKEN} tokens, expected "
                f"{self.num_image_tokens if has_image else 0} (cut by max_length={self.max_length}?)"
            )
        if all(label == IGNORE_INDEX for label in labels):
            raise RecordError(
                f"{where}: every label is masked ({len(input_ids)} tokens after "
                f"max_length={self.max_length}); refusing to train on a record without targets"
            )
        return {"input_ids": input_ids, "labels": labels}

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        encoded = self.encode(index)
        item: dict[str, Any] = {
            "id": record.get("id", index),
            "input_ids": torch.tensor(encoded["input_ids"], dtype=torch.long),
            "labels": torch.tensor(encoded["labels"], dtype=torch.long),
        }
        if "image" in record:
            item["pixel_values"] = self._load_pixels(index)
        if self.alignment:
            for key, field in (("response_ids", "conversations"), ("extended_ids", "conversations_long")):
                ids = self.tokenizer(
                    alignment_text(record[field]), truncation=True, max_length=self.max_length
                )["input_ids"]
                item[key] = torch.tensor(ids, dtype=torch.long)
        return item
