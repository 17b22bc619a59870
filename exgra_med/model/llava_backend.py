"""`LlavaBackend`: this project's LLaVA-style model (`ExGraMedForConditionalGeneration`) behind `Backend`.

A prompt is the template's rendering of the conversation with the image placeholder (`<image>`) expanded to the
model's number of image tokens; the image goes in as pixel values (3, H, W) from the vision tower's processor. VQA
questions use the record's question and the image after it ("question\\n<image>", the training layout), as the
reference's `model_vqa_med.py`; answers are cut at the template's stop string ("###").
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from exgra_med.constants import DEFAULT_IMAGE_TOKEN, HUMAN
from exgra_med.data.dataset import image_placeholder
from exgra_med.data.images import load_image, preprocess_image
from exgra_med.data.records import question_text
from exgra_med.model.backend import Backend, Message, Prompt, check_messages


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids padded on the LEFT with `pad_id`, and the (B, T) attention mask."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, length - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, length - len(s) :] = 1
    return ids, mask


class LlavaBackend(Backend):
    """The LLaVA-style model with its tokenizer (image tokens added) and the vision tower's image processor."""

    family = "llava"

    def render(self, messages: Sequence[Message], has_image: bool, system: str | None = None) -> str:
        """The prompt text: the image placeholder expanded in the first human turn, `system` replacing the
        template's system prompt."""
        messages = check_messages(messages)
        first = next(i for i, (role, _) in enumerate(messages) if role == HUMAN)
        if has_image:
            text = messages[first][1]
            if DEFAULT_IMAGE_TOKEN not in text:
                text = f"{text}\n{DEFAULT_IMAGE_TOKEN}"
            placeholder = image_placeholder(self.model.num_image_tokens, self.model.config.mm_use_im_start_end)
            messages[first] = (HUMAN, text.replace(DEFAULT_IMAGE_TOKEN, placeholder, 1))
        messages = [(r, t.replace(DEFAULT_IMAGE_TOKEN, "")) for r, t in messages]
        template = self.template if system is None else dataclasses.replace(self.template, system=system)
        return template.render(messages, add_generation_prompt=True)

    def prompt_text(self, messages: Sequence[Message], has_image: bool, system: str | None = None) -> str:
        return self.render(messages, has_image, system)

    def pixels(self, image: Image.Image | str | os.PathLike) -> torch.Tensor:
        """A PIL image or an image path (PNG/JPEG/DICOM) -> pixel values (3, H, W)."""
        if not isinstance(image, Image.Image):
            image = load_image(image)
        return preprocess_image(image.convert("RGB"), self.image_processor, self.image_aspect_ratio)

    def encode_conversation(self, messages: Sequence[Message], image: Image.Image | None = None,
                            system: str | None = None) -> Prompt:
        ids = self.tokenizer(self.render(messages, image is not None, system))["input_ids"]
        return Prompt(list(ids), None if image is None else self.pixels(image))

    def _question(self, record: dict) -> list[int]:
        return list(self.tokenizer(self.render([(HUMAN, question_text(record))], "image" in record))["input_ids"])

    def encode_question(self, record: dict, image_folder: str | os.PathLike | None) -> Prompt:
        if "image" not in record:
            return Prompt(self._question(record))
        if image_folder is None or self.image_processor is None:
            raise ValueError(f"record {record.get('id')!r} has an image but no image folder / processor was given")
        return Prompt(self._question(record), self.pixels(load_image(Path(image_folder) / record["image"])))

    def question_length(self, record: dict) -> int:
        return len(self._question(record))

    @property
    def decoder(self) -> torch.nn.Module:
        """The language model, as `generate` decodes: a generated token that happens to be the image placeholder is
        text there, not a request for pixels."""
        return self.model.language_model

    def generation_history(self, prompt: Prompt, generated: Sequence[int]) -> list[int]:
        """Only the generated tokens: `generate` starts from the merged embeddings and has no prompt ids."""
        return list(generated)

    def prompt_position_ids(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The language model's rule (`generate` runs on it, from the merged embeddings)."""
        return self.model.language_model._prepare_position_ids_for_generation(
            inputs["input_ids"], {"attention_mask": inputs["attention_mask"]})

    def batch_inputs(self, prompts: Sequence[Prompt]) -> dict[str, Any]:
        ids, mask = left_pad([p.input_ids for p in prompts], self.pad_token_id)  # (B, T)
        images = [p.images for p in prompts if p.images is not None]
        pixels = torch.stack(images).to(self.device) if images else None  # (B_img, 3, H, W)
        return {"input_ids": ids.to(self.device), "pixel_values": pixels, "attention_mask": mask.to(self.device)}
