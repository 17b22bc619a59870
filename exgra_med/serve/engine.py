"""The one inference helper behind chat, web and API: prompt building, image preprocessing, streamed generation.

A conversation is a list of (role, text) messages (`"human"` / `"gpt"`) ending with a human turn, plus
at most one image, attached to the first human turn as in LLaVA-Med. `<image>` in that turn marks where
the image goes; without it the image follows the question ("question\\n<image>", the training layout).
Model access is serialised by a lock, so concurrent callers (API requests, web users) queue up.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from exgra_med.constants import DEFAULT_IMAGE_TOKEN
from exgra_med.conversation import GPT, HUMAN, ConversationTemplate, get_template
from exgra_med.data.dataset import image_placeholder
from exgra_med.data.images import load_image, preprocess_image
from exgra_med.serve.streaming import AnswerFilter

logger = logging.getLogger(__name__)

Message = tuple[str, str]


@dataclass
class GenerationInfo:
    """Filled by `InferenceEngine.stream`: token counts and why generation ended ("stop" or "length")."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"


@dataclass
class GenerationSettings:
    """Decoding options; `temperature == 0` means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class _CancelCriteria:
    """Stops generation when the consumer of a stream goes away (closed generator, dropped client)."""

    def __init__(self, event: threading.Event):
        self.event = event
        self.generated = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self.generated = input_ids.shape[1]  # generation from embeddings: only the new tokens
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class InferenceEngine:
    """A loaded model + tokenizer + image processor with the prompt template used to talk to it."""

    def __init__(
        self,
        model,
        tokenizer,
        image_processor,
        template: str | ConversationTemplate = "llava_med",
        image_aspect_ratio: str = "pad",
        name: str = "exgra-med",
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = get_template(template) if isinstance(template, str) else template
        self.image_aspect_ratio = image_aspect_ratio
        self.name = name
        self.lock = threading.Lock()

    @classmethod
    def from_path(
        cls,
        path: str,
        vision_tower: str | None = None,
        template: str | None = None,
        load_4bit: bool = False,
        load_8bit: bool = False,
        device: str | None = None,
        dtype: torch.dtype | None = None,
    ) -> InferenceEngine:
        """Load either checkpoint layout (see `exgra_med.serve.loading.load_model`) and wrap it. `template` defaults
        to the one the checkpoint was trained with, else `llava_med`."""
        from exgra_med.model.checkpoint import recorded_conv_template
        from exgra_med.serve.loading import load_model

        template = template or recorded_conv_template(path) or "llava_med"
        model, tokenizer, processor = load_model(
            path, vision_tower=vision_tower, dtype=dtype, device=device, load_4bit=load_4bit, load_8bit=load_8bit
        )
        name = os.path.basename(os.path.normpath(path)) or "exgra-med"
        return cls(model, tokenizer, processor, template=template, name=name)

    @property
    def device(self) -> torch.device:
        """Where the inputs go (the embedding matrix's device)."""
        return self.model.get_input_embeddings().weight.device

    # --- prompt ------------------------------------------------------------------------------------------
    def build_prompt(self, messages: Sequence[Message], has_image: bool, system: str | None = None) -> str:
        """The full prompt text, image placeholder expanded to the model's number of image tokens.

        `system` replaces the template's system prompt (e.g. an API request's system message).
        """
        messages = [(role, text) for role, text in messages]
        if not messages or messages[-1][0] != HUMAN:
            raise ValueError("the conversation must end with a human message")
        for role, _ in messages:
            if role not in (HUMAN, GPT):
                raise ValueError(f"message role must be {HUMAN!r} or {GPT!r}, got {role!r}")
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

    def encode(self, messages: Sequence[Message], has_image: bool, system: str | None = None) -> torch.LongTensor:
        """Prompt token ids, (1, T)."""
        prompt = self.build_prompt(messages, has_image, system)
        return self.tokenizer(prompt, return_tensors="pt").input_ids.to(self.device)

    def preprocess(self, image: Image.Image | str | os.PathLike) -> torch.Tensor:
        """A PIL image or an image path (PNG/JPEG/DICOM) -> pixel values (1, 3, H, W) on the model's device."""
        if not isinstance(image, Image.Image):
            image = load_image(image)
        pixels = preprocess_image(image.convert("RGB"), self.image_processor, self.image_aspect_ratio)
        tower_dtype = next(self.model.vision_tower.parameters()).dtype
        return pixels.unsqueeze(0).to(self.device, tower_dtype)

    # --- generation --------------------------------------------------------------------------------------
    def _generate_kwargs(self, settings: GenerationSettings) -> dict:
        kwargs = {
            "max_new_tokens": settings.max_new_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
        }
        if self.template.stop_str:
            kwargs.update(stop_strings=[self.template.stop_str], tokenizer=self.tokenizer)
        if settings.temperature > 0:
            kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    def stream(
        self,
        messages: Sequence[Message],
        image: Image.Image | str | os.PathLike | None = None,
        settings: GenerationSettings | None = None,
        system: str | None = None,
        info: GenerationInfo | None = None,
    ) -> Iterator[str]:
        """Yield the answer as text chunks while it is generated (cut at the template's stop string).

        `info`, when given, receives the token counts and the finish reason once the stream ends.
        """
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        settings = settings or GenerationSettings()
        input_ids = self.encode(messages, has_image=image is not None, system=system)
        pixels = self.preprocess(image) if image is not None else None
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        cancel = threading.Event()
        counter = _CancelCriteria(cancel)
        kwargs = self._generate_kwargs(settings)
        kwargs.update(streamer=streamer, stopping_criteria=StoppingCriteriaList([counter]))
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self.model.generate(input_ids, pixels, torch.ones_like(input_ids), **kwargs)
            except Exception as e:  # noqa: BLE001 - handed to the consumer thread, which re-raises it
                errors.append(e)
                streamer.end()

        answer = AnswerFilter(self.template)
        with self.lock:
            worker = threading.Thread(target=run, name="exgra-med-generate", daemon=True)
            worker.start()
            try:
                for chunk in streamer:
                    if errors:
                        break
                    piece = answer.push(chunk)
                    if piece:
                        yield piece
                    if answer.stopped:
                        break
                if errors:
                    raise errors[0]
                stopped_by_text = answer.stopped
                tail = answer.finish()
                if tail:
                    yield tail
            finally:
                cancel.set()
                worker.join()
        if info is not None:
            info.prompt_tokens = int(input_ids.shape[1])
            info.completion_tokens = counter.generated
            hit_limit = counter.generated >= settings.max_new_tokens and not stopped_by_text
            info.finish_reason = "length" if hit_limit else "stop"

    def answer(
        self,
        messages: Sequence[Message],
        image: Image.Image | str | os.PathLike | None = None,
        settings: GenerationSettings | None = None,
        system: str | None = None,
        info: GenerationInfo | None = None,
    ) -> str:
        """The whole answer at once (the concatenation of `stream`)."""
        return "".join(self.stream(messages, image, settings, system, info))
