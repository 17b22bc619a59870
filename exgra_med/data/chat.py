"""Records through a native VLM's own processor and chat template: training items, prompts, batches.

A record (the project's LLaVA-style JSON, one image or a list of them) becomes chat messages: human turns are
"user" messages whose content holds the text and one image item per `<image>`, in order; gpt turns are "assistant"
messages. The processor's chat template renders them and the processor expands each image into the model's own
number of image tokens (dynamic resolution, tiles, ...).

Labels: only the assistant answers and the end-of-turn token that closes each of them (the model's end of
sequence, e.g. `<|im_end|>` or `<end_of_turn>`) are targets. The template is rendered once with a sentinel in place
of each answer, which locates the answers in the text whatever the template's layout; that text (with the answers)
is tokenized with offsets as in `exgra_med.data.dataset`, and the tokens are matched to the processor's expanded ids,
which differ only by the inserted image tokens. Any disagreement raises instead of training on a wrong mask.

Padding-free batches (`NativeCollator(padding_free=True)`): the samples side by side in rows as
`exgra_med.data.collate.DataCollator` packs them (`pack_rows`; positions restarting per sample, each sample's first
label IGNORE_INDEX, per-token inputs packed alike, no attention mask). The model scatters image features into the
image tokens in the order they appear in the flattened rows, so the per-image inputs follow the rows' sample order,
`row_order`; the alignment texts, `ids` and `images_per_sample` keep the batch order (the alignment's noise is drawn
per batch index, so the packed batch aligns exactly as the padded one).
"""

from __future__ import annotations

import copy
import difflib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from exgra_med.constants import DEFAULT_IMAGE_TOKEN, GPT, IGNORE_INDEX
from exgra_med.conversation import Segment
from exgra_med.data.collate import pack_row_tensors, pack_rows, pad_right
from exgra_med.data.dataset import TokenizationMismatchError, alignment_text, tokenize_segments
from exgra_med.data.images import DEFAULT_ASPECT_RATIO, ImageLoadError, expand2square, load_image
from exgra_med.data.records import RecordError, load_records, record_images, record_label

logger = logging.getLogger(__name__)

_SENTINEL = "\ue000{}\ue001"  # private-use characters: never in a template or a record
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")
# Processor outputs aligned with the tokens (padded with the ids); all others are per image and concatenated.
TOKEN_ALIGNED = ("token_type_ids", "mm_token_type_ids")
# Per-sample counts a processor emits only for samples with images (0 for the others in a mixed batch).
PER_SAMPLE_COUNTS = ("batch_num_images",)


def record_messages(turns: Sequence[dict]) -> list[dict]:
    """Chat messages of a record's turns: user content = text pieces and one image item per `<image>`, in order."""
    messages = []
    for turn in turns:
        if turn["from"] == GPT:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn["value"].strip()}]})
            continue
        content: list[dict] = []
        for i, piece in enumerate(turn["value"].split(DEFAULT_IMAGE_TOKEN)):
            if i:
                content.append({"type": "image"})
            if piece.strip():
                content.append({"type": "text", "text": piece.strip()})
        messages.append({"role": "user", "content": content})
    return messages


def stop_strings(processor, generation_config=None) -> list[str]:
    """The end-of-sequence tokens as text: the tokenizer's and those of the model's generation config."""
    tokenizer = processor.tokenizer
    ids = getattr(generation_config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    names = [tokenizer.eos_token] + [tokenizer.convert_ids_to_tokens(int(i)) for i in ids]
    return sorted({n for n in names if n}, key=len, reverse=True)


@dataclass
class Encoded:
    """One conversation through the processor: ids (T,), labels (T,) or None, per-token model inputs ((T,) each),
    per-image model inputs (first dimension: images or patches), and its number of images."""

    input_ids: torch.Tensor
    labels: torch.Tensor | None = None
    token_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    image_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    n_images: int = 0


class ChatEncoder:
    """Renders records with a processor's chat template and encodes them with their images."""

    def __init__(self, processor, stops: Sequence[str], image_aspect_ratio: str = DEFAULT_ASPECT_RATIO):
        if getattr(processor, "chat_template", None) is None:
            raise ValueError(f"{type(processor).__name__} has no chat template (chat_template.jinja); the native "
                             "path renders records with the model's own template")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        if not getattr(self.tokenizer, "is_fast", False):
            raise TypeError("the native data path needs a fast tokenizer (offset mappings for the labels)")
        self.stops = list(stops)
        self.image_aspect_ratio = image_aspect_ratio
        self._warned_no_stop = False

    # --- images ------------------------------------------------------------------------------------------
    def load_images(self, paths: Sequence[str | os.PathLike], folder: str | os.PathLike | None,
                    where: str = "record") -> list[Image.Image]:
        """The images of a record, RGB, padded to a square with the processor's mean colour when asked."""
        images = []
        for path in paths:
            try:
                img = load_image(Path(folder) / path if folder is not None else Path(path))
            except ImageLoadError as e:
                raise ImageLoadError(f"{where}: {e}") from e
            images.append(self.prepare_image(img))
        return images

    def prepare_image(self, img: Image.Image) -> Image.Image:
        """`img` as the processor gets it (RGB; padded to a square with its mean colour under "pad")."""
        img = img.convert("RGB")
        if self.image_aspect_ratio == "pad":
            mean = getattr(self.processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
            img = expand2square(img, tuple(int(x * 255) for x in mean))
        return img

    # --- rendering -----------------------------------------------------------------------------------------
    def render_segments(self, messages: list[dict], where: str) -> list[Segment]:
        """The chat template's rendering of `messages` as target (answers + their end-of-turn token) and other text."""
        answers = [m["content"][0]["text"] for m in messages if m["role"] == "assistant"]
        sentinel_messages, k = copy.deepcopy(messages), 0
        for message in sentinel_messages:
            if message["role"] == "assistant":
                message["content"] = [{"type": "text", "text": _SENTINEL.format(k)}]
                k += 1
        rendered = self.processor.apply_chat_template(sentinel_messages, tokenize=False)
        pieces = _SENTINEL_RE.split(rendered)  # text, index, text, index, ..., text
        if [int(i) for i in pieces[1::2]] != list(range(len(answers))):
            raise TokenizationMismatchError(f"{where}: the chat template does not render each answer once, in order")
        segments = [Segment(pieces[0], False)]
        for k, answer in enumerate(answers):
            following = pieces[2 * k + 2]
            stop = next((s for s in self.stops if following.lstrip().startswith(s)), None)
            if stop is None:
                end = 0
                if not self._warned_no_stop:
                    logger.warning("%s: the chat template does not close answers with an end-of-sequence token (%s); "
                                   "answers are trained without one", where, self.stops)
                    self._warned_no_stop = True
            else:
                end = len(following) - len(following.lstrip()) + len(stop)
            segments += [Segment(answer + following[:end], True), Segment(following[end:], False)]
        text = "".join(s.text for s in segments)
        if text != self.processor.apply_chat_template(messages, tokenize=False):
            raise TokenizationMismatchError(
                f"{where}: the chat template changes the answers' text when it renders them; the label mask cannot "
                "follow it"
            )
        return [s for s in segments if s.text]

    def prompt_text(self, messages: list[dict]) -> str:
        """The rendered prompt of a conversation ending with a user turn, with the template's generation prompt."""
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # --- encoding ------------------------------------------------------------------------------------------
    def process(self, text: str, images: Sequence[Image.Image]) -> Encoded:
        """`text` (rendered, special tokens included) and its images through the processor, unpadded."""
        out = self.processor(text=[text], images=[list(images)] if images else None, return_tensors="pt",
                             add_special_tokens=False)
        ids = out.pop("input_ids")[0]
        out.pop("attention_mask", None)
        token_inputs = {k: out.pop(k)[0] for k in TOKEN_ALIGNED if k in out}
        image_inputs = {k: torch.as_tensor(v) for k, v in out.items()}
        return Encoded(ids, None, token_inputs, image_inputs, len(images))

    def encode_prompt(self, messages: list[dict], images: Sequence[Image.Image]) -> Encoded:
        """A generation prompt: the conversation (ending with a user turn) rendered with the generation prompt."""
        return self.process(self.prompt_text(messages), images)

    def encode_training(self, messages: list[dict], images: Sequence[Image.Image], where: str,
                        max_length: int | None = None) -> Encoded:
        """Ids and labels of a training conversation (see the module docstring), cut to `max_length` tokens."""
        segments = self.render_segments(messages, where)
        text_ids, text_labels = tokenize_segments(segments, self.tokenizer, where, add_special_tokens=False)
        encoded = self.process("".join(s.text for s in segments), images)
        ids = encoded.input_ids.tolist()
        labels = [IGNORE_INDEX] * len(ids)
        inserted = [True] * len(ids)
        matcher = difflib.SequenceMatcher(None, text_ids, ids, autojunk=False)
        for block in matcher.get_matching_blocks():
            for k in range(block.size):
                labels[block.b + k] = text_labels[block.a + k]
                inserted[block.b + k] = False
        if sum(label != IGNORE_INDEX for label in labels) != sum(label != IGNORE_INDEX for label in text_labels):
            raise TokenizationMismatchError(
                f"{where}: the processor's tokens of the answers differ from the tokenizer's; the label mask cannot "
                "follow them"
            )
        if max_length is not None and len(ids) > max_length:
            if any(inserted[max_length:]):
                raise RecordError(f"{where}: {len(ids)} tokens; the image tokens reach beyond --model_max_length "
                                  f"{max_length}")
            ids, labels = ids[:max_length], labels[:max_length]
            encoded.token_inputs = {k: v[:max_length] for k, v in encoded.token_inputs.items()}
        if all(label == IGNORE_INDEX for label in labels):
            raise RecordError(f"{where}: every label is masked ({len(ids)} tokens, max_length={max_length}); "
                              "refusing to train on a record without targets")
        encoded.input_ids = torch.tensor(ids, dtype=torch.long)
        encoded.labels = torch.tensor(labels, dtype=torch.long)
        return encoded


class NativeDataset(Dataset):
    """Training records for a native VLM, encoded lazily (`ChatEncoder.encode_training`), with the alignment texts
    (METHOD section 3) tokenized by the model's tokenizer when `alignment` is on."""

    def __init__(self, data_path: str | os.PathLike, image_folder: str | os.PathLike | None, encoder: ChatEncoder,
                 max_length: int = 2048, alignment: bool = False, records: list[dict] | None = None) -> None:
        self.data_path = str(data_path)
        self.records = records if records is not None else load_records(data_path, alignment, multi_image=True)
        self.image_folder = image_folder
        self.encoder = encoder
        self.max_length = max_length
        self.alignment = alignment

    def __len__(self) -> int:
        return len(self.records)

    def _where(self, index: int) -> str:
        return f"{self.data_path}: {record_label(self.records[index], index)}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        record, where = self.records[index], self._where(index)
        images = self.encoder.load_images(record_images(record), self.image_folder, where)
        encoded = self.encoder.encode_training(record_messages(record["conversations"]), images, where,
                                               self.max_length)
        item: dict[str, Any] = {"id": record.get("id", index), "encoded": encoded}
        if self.alignment:
            tokenizer = self.encoder.tokenizer
            for key, name in (("response_ids", "conversations"), ("extended_ids", "conversations_long")):
                ids = tokenizer(alignment_text(record[name]), truncation=True, max_length=self.max_length)["input_ids"]
                item[key] = torch.tensor(ids, dtype=torch.long)
        return item


def _pad_trailing(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Zero-pad every dimension but the first to the largest (e.g. LLaVA-OneVision's tiles per image)."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    out = []
    for t in tensors:
        if list(t.shape[1:]) != shape:
            padded = t.new_zeros((t.shape[0], *shape))
            padded[tuple(slice(0, s) for s in t.shape)] = t
            t = padded
        out.append(t)
    return out


def _image_inputs(encoded: Sequence[Encoded]) -> dict[str, torch.Tensor]:
    """Per-image inputs of `encoded` concatenated in that order (per-sample counts stacked, 0 for no image)."""
    batch: dict[str, torch.Tensor] = {}
    for key in sorted({k for e in encoded for k in e.image_inputs}):
        if key in PER_SAMPLE_COUNTS:
            values = [e.image_inputs.get(key, torch.zeros(1, dtype=torch.long)) for e in encoded]
        else:
            values = [e.image_inputs[key] for e in encoded if key in e.image_inputs]
        batch[key] = torch.cat(_pad_trailing(values)) if values[0].dim() else torch.stack(values)
    return batch


def collate_encoded(encoded: Sequence[Encoded], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Model inputs of a batch: ids / attention mask (and labels, per-token inputs) padded on `padding_side`, per-image
    inputs concatenated in sample order, and `images_per_sample` (a list of B counts)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be left or right, got {padding_side!r}")

    def pad(seqs: list[torch.Tensor], value: int) -> tuple[torch.Tensor, torch.Tensor]:
        if padding_side == "right":
            return pad_right(seqs, value)
        flipped, mask = pad_right([s.flip(0) for s in seqs], value)
        return flipped.flip(1), mask.flip(1)

    batch: dict[str, torch.Tensor] = {}
    batch["input_ids"], batch["attention_mask"] = pad([e.input_ids for e in encoded], pad_id)
    if all(e.labels is not None for e in encoded):
        batch["labels"] = pad([e.labels for e in encoded], IGNORE_INDEX)[0]
    for key in sorted({k for e in encoded for k in e.token_inputs}):
        batch[key] = pad([e.token_inputs.get(key, torch.zeros_like(e.input_ids)) for e in encoded], 0)[0]
    batch.update(_image_inputs(encoded))
    batch["images_per_sample"] = [e.n_images for e in encoded]  # a list: read on the host, never synced
    return batch


def pack_encoded(encoded: Sequence[Encoded], pad_id: int, one_row: bool = False) -> dict[str, Any]:
    """Padding-free model inputs of training samples (see the module docstring): `input_ids`, `labels`,
    `position_ids` and the per-token inputs (R, C); the per-image inputs in `row_order` (a list of B batch indices,
    the samples in the order the rows hold them); `images_per_sample` in batch order."""
    lengths = [len(e.input_ids) for e in encoded]
    if min(lengths) == 0 or any(e.labels is None for e in encoded):
        raise ValueError("padding-free batches pack training samples with tokens and labels")
    rows = pack_rows(lengths, one_row)
    order = [i for row in rows for i in row]
    token_keys = sorted({k for e in encoded for k in e.token_inputs})
    samples = [{"input_ids": encoded[i].input_ids, "labels": encoded[i].labels, **encoded[i].token_inputs}
               for i in order]
    batch: dict[str, Any] = pack_row_tensors(samples, [len(row) for row in rows], pad_id, token_keys)
    batch.update(_image_inputs([encoded[i] for i in order]))
    batch["images_per_sample"] = [e.n_images for e in encoded]  # lists: read on the host, never synced
    batch["row_order"] = order
    return batch


class NativeCollator:
    """Batches `NativeDataset` items: right padding, labels with IGNORE_INDEX, alignment texts with their masks; or
    the samples packed into rows without padding (`padding_free`; all in one row with `one_row`, see `pack_encoded`)."""

    def __init__(self, pad_token_id: int, padding_free: bool = False, one_row: bool = False):
        self.pad_token_id = int(pad_token_id)
        self.padding_free = padding_free
        self.one_row = one_row

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        encoded = [x["encoded"] for x in items]
        if self.padding_free:
            empty = [x["id"] for x, e in zip(items, encoded) if len(e.input_ids) == 0]
            if empty:
                raise ValueError(f"cannot pack samples without tokens (ids {empty})")
            batch: dict[str, Any] = pack_encoded(encoded, self.pad_token_id, self.one_row)
        else:
            batch = collate_encoded(encoded, self.pad_token_id)
        batch["ids"] = [x["id"] for x in items]
        for key, mask in (("response_ids", "response_mask"), ("extended_ids", "extended_mask")):
            if key in items[0]:
                batch[key], batch[mask] = pad_right([x[key] for x in items], self.pad_token_id)
        return batch
