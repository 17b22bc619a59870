"""`NativeBackend`: a transformers-native VLM (any folder `AutoModelForImageTextToText` loads) behind `Backend`.

Questions and conversations are rendered with the model's own chat template and encoded by its processor
(`exgra_med.data.chat.ChatEncoder`), which expands each image into the model's own image tokens (dynamic resolution,
tiles, ...); batches of left-padded prompts are decoded with `generate`, and the model's own end-of-sequence tokens
end each row (the chat template replaces the project's prompt templates: no stop string).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from exgra_med.constants import DEFAULT_IMAGE_TOKEN, HUMAN
from exgra_med.conversation import ConversationTemplate
from exgra_med.data.chat import ChatEncoder, collate_encoded, record_messages, stop_strings
from exgra_med.data.images import DEFAULT_ASPECT_RATIO
from exgra_med.data.records import record_images
from exgra_med.model.backend import Backend, Message, Prompt, check_messages

logger = logging.getLogger(__name__)

# The template a native model's answers are cut with: no stop string, no role prefix (the chat template and the
# model's end-of-sequence tokens end an answer).
CHAT_TEMPLATE = ConversationTemplate("chat_template", "plain", "", ("", ""), "")
CHAT_TEMPLATE_NAME = CHAT_TEMPLATE.name
# Kept unquantised under 4-/8-bit loading: the vision encoders (Qwen's `visual`, SigLIP `vision_tower`), the
# projectors / mergers and the output head.
QUANT_SKIP_MODULES = ("visual", "vision_tower", "multi_modal_projector", "merger", "lm_head")


class NativeBackend(Backend):
    """A native VLM with its processor (see the module docstring)."""

    family = "native"

    def __init__(self, model, processor, image_aspect_ratio: str = DEFAULT_ASPECT_RATIO):
        self.processor = processor
        stops = stop_strings(processor, model.generation_config)
        self.encoder = ChatEncoder(processor, stops, image_aspect_ratio)
        self._eos = {int(i) for i in processor.tokenizer.convert_tokens_to_ids(stops) if i is not None}
        super().__init__(model, processor.tokenizer, processor.image_processor, CHAT_TEMPLATE, image_aspect_ratio)

    @property
    def image_aspect_ratio(self) -> str:
        """The encoder's image preprocessing (square, or pad to a square first)."""
        return self.encoder.image_aspect_ratio

    @image_aspect_ratio.setter
    def image_aspect_ratio(self, value: str) -> None:
        self.encoder.image_aspect_ratio = value

    @property
    def eos_token_ids(self) -> set[int]:
        """The model's end-of-sequence tokens (e.g. `<end_of_turn>` besides `<eos>`)."""
        return set(self._eos)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else min(self._eos))

    # --- prompts ---------------------------------------------------------------------------------------------
    def encode_conversation(self, messages: Sequence[Message], image: Image.Image | None = None,
                            system: str | None = None) -> Prompt:
        """The chat template's prompt: the image goes where the first human turn says `<image>`, else before its
        text; `system` becomes a system message."""
        turns = [{"from": role, "value": text} for role, text in check_messages(messages)]
        if image is None:
            turns = [{**t, "value": t["value"].replace(DEFAULT_IMAGE_TOKEN, "")} for t in turns]
        images = [] if image is None else [self.encoder.prepare_image(image)]
        marked = sum(t["value"].count(DEFAULT_IMAGE_TOKEN) for t in turns if t["from"] == HUMAN)
        if images and marked == 0:
            first = next(i for i, t in enumerate(turns) if t["from"] == HUMAN)
            turns[first] = {"from": HUMAN, "value": DEFAULT_IMAGE_TOKEN + turns[first]["value"]}
        elif marked != len(images):
            raise ValueError(f"the conversation marks {marked} images with <image> but {len(images)} were given")
        chat = record_messages(turns)
        if system:
            chat.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
        encoded = self.encoder.encode_prompt(chat, images)
        return Prompt(encoded.input_ids.tolist(), encoded)

    def question_messages(self, record: dict) -> list[dict]:
        """The chat of a VQA record: its first human turn (with its `<image>` items), no answer."""
        turns = record.get("conversations", record.get("conversatons"))
        first = dict(turns[0])
        images = len(record_images(record))
        if images and DEFAULT_IMAGE_TOKEN not in first["value"]:
            first["value"] = DEFAULT_IMAGE_TOKEN * images + first["value"]
        return record_messages([first])

    def encode_question(self, record: dict, image_folder: str | os.PathLike | None) -> Prompt:
        where = f"record {record.get('id')!r}"
        images = self.encoder.load_images(record_images(record), image_folder, where)
        encoded = self.encoder.encode_prompt(self.question_messages(record), images)
        return Prompt(encoded.input_ids.tolist(), encoded)

    def question_length(self, record: dict) -> int:
        """Prompt tokens without the image tokens (the processor adds those when it sees the image)."""
        text = self.encoder.prompt_text(self.question_messages(record))
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # --- generation ----------------------------------------------------------------------------------------
    def batch_inputs(self, prompts: Sequence[Prompt]) -> dict[str, Any]:
        """Left-padded processor outputs on the model's device, images in the model's dtype."""
        batch = collate_encoded([p.images for p in prompts], self.pad_token_id, padding_side="left")
        batch.pop("images_per_sample")
        dtype = self.model.dtype
        return {k: v.to(self.device, dtype=dtype if v.is_floating_point() else None) for k, v in batch.items()}

    def new_tokens(self, out: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        return out[:, inputs["input_ids"].shape[1]:]


def load_native(path: str, dtype: torch.dtype | None = None, device: str | None = None,
                attn_implementation: str = "sdpa", quantization_config: object | None = None):
    """(model, processor) of a native VLM folder through transformers' Auto classes, on `device` (quantised
    weights are placed while loading)."""
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map={"": device})
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    if quantization_config is None and device is not None:
        model.to(device)
    logger.info("loaded %s (%s, %s, %s)", path, model.config.model_type, device or "cpu", model.dtype)
    return model, AutoProcessor.from_pretrained(path)
