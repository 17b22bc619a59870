"""A native VLM + its processor behind the project's evaluation and serving engines.

`NativeVLM` encodes questions and conversations with the model's chat template and processor (`data.ChatEncoder`),
decodes batches of left-padded prompts with `generate` (the model's own end-of-sequence tokens end each row), and
answers VQA records the way `exgra_med.eval.generate.generate_answers` does for the LLaVA model (batches of prompts of
similar length, per-batch callback, per-question error capture), so that `generate-vqa`, `zero-shot`,
`grounding-audit` and in-training VQA scoring run unchanged on native models. The chat template replaces the
project's prompt templates: answers end at the model's end of sequence, not at a stop string.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import GenerationConfig

from exgra_med.conversation import GPT, HUMAN, ConversationTemplate
from exgra_med.data.images import DEFAULT_ASPECT_RATIO
from exgra_med.data.records import record_images
from exgra_med.eval.generate import BatchCallback, answer_in_batches
from exgra_med.vlm.data import ChatEncoder, Encoded, collate_encoded, record_messages, stop_strings

logger = logging.getLogger(__name__)

# What the engines' answer filters see for a native model: no stop string, no role prefix (the chat template and the
# model's end-of-sequence tokens end an answer).
CHAT_TEMPLATE = ConversationTemplate("chat_template", "plain", "", ("", ""), "")
CHAT_TEMPLATE_NAME = CHAT_TEMPLATE.name


class NativeVLM:
    """A transformers-native VLM in eval mode with its processor (see the module docstring)."""

    is_native_vlm = True

    def __init__(self, model, processor, image_aspect_ratio: str = DEFAULT_ASPECT_RATIO):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        stops = stop_strings(processor, model.generation_config)
        self.encoder = ChatEncoder(processor, stops, image_aspect_ratio)
        self.eos_token_ids = sorted({int(i) for i in self.tokenizer.convert_tokens_to_ids(stops) if i is not None})
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.eos_token_ids[0])

    @classmethod
    def load(cls, path: str, dtype: torch.dtype | None = None, device: str | None = None,
             attn_implementation: str = "sdpa", quantization_config: object | None = None,
             image_aspect_ratio: str = DEFAULT_ASPECT_RATIO) -> NativeVLM:
        """Load a native VLM folder with transformers' Auto classes onto `device` (quantised when asked)."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
        if quantization_config is not None:
            kwargs.update(quantization_config=quantization_config, device_map={"": device})
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        if quantization_config is None and device is not None:
            model.to(device)
        logger.info("loaded %s (%s, %s, %s)", path, model.config.model_type, device or "cpu", model.dtype)
        return cls(model.eval(), AutoProcessor.from_pretrained(path), image_aspect_ratio)

    # --- the model interface the engines touch --------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def training(self) -> bool:
        return self.model.training

    def train(self, mode: bool = True) -> NativeVLM:
        self.model.train(mode)
        return self

    def eval(self) -> NativeVLM:
        return self.train(False)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    # --- encoding ---------------------------------------------------------------------------------------------
    def encode_conversation(self, messages: Sequence[tuple[str, str]], images: Sequence[Image.Image],
                            system: str | None = None) -> Encoded:
        """A prompt from (role, text) messages ending with a human turn; `images` go where the human turns say
        `<image>` (or before the first human turn's text when it says nothing); `system` becomes a system message."""
        turns = [{"from": role, "value": text} for role, text in messages]
        if not turns or turns[-1]["from"] != HUMAN or any(t["from"] not in (HUMAN, GPT) for t in turns):
            raise ValueError(f"the conversation must hold {HUMAN!r}/{GPT!r} messages and end with a human one")
        marked = sum(t["value"].count("<image>") for t in turns if t["from"] == HUMAN)
        if images and marked == 0:
            turns[0] = {"from": HUMAN, "value": "<image>" * len(images) + turns[0]["value"]}
        elif marked != len(images):
            raise ValueError(f"the conversation marks {marked} images with <image> but {len(images)} were given")
        chat = record_messages(turns)
        if system:
            chat.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
        return self.encoder.encode_prompt(chat, [self.encoder.prepare_image(i) for i in images])

    def question_messages(self, record: dict) -> list[dict]:
        """The chat of a VQA record: its first human turn (with its `<image>` items), no answer."""
        turns = record.get("conversations", record.get("conversatons"))
        first = dict(turns[0])
        images = len(record_images(record))
        if images and "<image>" not in first["value"]:
            first["value"] = "<image>" * images + first["value"]
        return record_messages([first])

    def encode_record(self, record: dict, image_folder: str | os.PathLike | None) -> Encoded:
        """The generation prompt of a VQA record with its images (errors name the record)."""
        where = f"record {record.get('id')!r}"
        images = self.encoder.load_images(record_images(record), image_folder, where)
        return self.encoder.encode_prompt(self.question_messages(record), images)

    # --- generation -------------------------------------------------------------------------------------------
    def generation_config(self, max_new_tokens: int, temperature: float = 0.0, top_p: float | None = None,
                          **overrides) -> GenerationConfig:
        """Greedy (temperature 0) or sampled decoding ending at the model's end-of-sequence tokens."""
        sampling = temperature > 0
        return GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=sampling, temperature=temperature if sampling else None,
            top_p=top_p if sampling else None, top_k=None, num_beams=1, use_cache=True,
            pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_ids, **overrides,
        )

    def batch_inputs(self, encoded: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        """Model inputs of left-padded prompts on the model's device, images in the model's dtype."""
        batch = collate_encoded(encoded, self.pad_token_id, padding_side="left")
        batch.pop("images_per_sample")
        dtype = self.model.dtype
        return {k: v.to(self.device, dtype=dtype if v.is_floating_point() else None) for k, v in batch.items()}

    @torch.inference_mode()
    def generate(self, encoded: Sequence[Encoded], generation_config: GenerationConfig, **kwargs) -> torch.Tensor:
        """New token ids (B, T_new) for prompts decoded together (streamer, stopping criteria... in `kwargs`)."""
        inputs = self.batch_inputs(encoded)
        out = self.model.generate(**inputs, generation_config=generation_config, **kwargs)
        return out[:, inputs["input_ids"].shape[1]:]

    def decode(self, new_tokens: torch.Tensor) -> list[str]:
        """Answer texts: special tokens (end of turn, padding) dropped, white space stripped."""
        return [t.strip() for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def answer_records(
        self, records: Sequence[dict], batch_size: int = 16, max_new_tokens: int = 1024, *,
        image_folder: str | os.PathLike | None = None, temperature: float = 0.0,
        on_batch: BatchCallback | None = None, errors: dict[str, str] | None = None, progress: bool = False,
        generate_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, str]:
        """`{str(id): answer}` for VQA `records` in batches of prompts of similar length (longest first; the image
        tokens are not counted in the order); the contract of `exgra_med.eval.generate.generate_answers`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        lengths = [len(self.tokenizer(self.encoder.prompt_text(self.question_messages(r)),
                                      add_special_tokens=False)["input_ids"]) for r in records]
        order = sorted(range(len(records)), key=lambda i: -lengths[i])
        config = self.generation_config(max_new_tokens, temperature)
        kwargs = generate_kwargs or {}
        return answer_in_batches(
            records, order, batch_size, lambda i: self.encode_record(records[i], image_folder),
            lambda batch, encoded: self.decode(self.generate(encoded, config, **kwargs)),
            on_batch=on_batch, errors=errors, progress=progress,
        )


def as_native(model, processor) -> NativeVLM | None:
    """`model` as a `NativeVLM` when it is one, a native VLM under training (`head.AlignedVLM`) or a bare native
    transformers model with its processor; None for the LLaVA model."""
    if getattr(model, "is_native_vlm", False):
        return model
    from transformers import ProcessorMixin

    from exgra_med.vlm.head import AlignedVLM

    if isinstance(model, AlignedVLM) and isinstance(processor, ProcessorMixin):
        return NativeVLM(model.base_vlm, processor)
    return None

