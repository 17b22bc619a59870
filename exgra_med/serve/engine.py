"""The one inference helper behind chat, web and API: prompt building, image preprocessing, streamed generation.

A conversation is a list of (role, text) messages (`"human"` / `"gpt"`) ending with a human turn, plus
at most one image, attached to the first human turn as in LLaVA-Med. `<image>` in that turn marks where
the image goes; without it the image follows the question ("question\\n<image>", the training layout).
Concurrent callers (API requests, web users) are decoded together in batches (`batching.BatchScheduler`), behind a
bounded queue. Prompts are checked against the model's context and `max_prompt_tokens` before any work
(`PromptTooLongError`); a prompt far too long is refused from its length in characters, before tokenizing it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from exgra_med.constants import DEFAULT_IMAGE_TOKEN
from exgra_med.conversation import GPT, HUMAN, ConversationTemplate, get_template
from exgra_med.data.dataset import image_placeholder
from exgra_med.data.images import DEFAULT_ASPECT_RATIO, load_image, preprocess_image
from exgra_med.errors import UserError
from exgra_med.serve.batching import BatchScheduler, Job

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
    min_new_tokens: int = 0  # neither end of sequence nor stop string before this many tokens (vLLM's min_tokens)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                             f"got {self.min_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class PromptTooLongError(UserError):
    """The conversation (history included) does not fit the model's context or the server's prompt limit."""


class InferenceEngine:
    """A loaded model + tokenizer + image processor with the prompt template used to talk to it."""

    def __init__(
        self,
        model,
        tokenizer,
        image_processor,
        template: str | ConversationTemplate = "llava_med",
        image_aspect_ratio: str = DEFAULT_ASPECT_RATIO,
        name: str = "exgra-med",
        max_prompt_tokens: int | None = None,
        max_batch_size: int = 8,
        max_queue: int = 32,
    ):
        """`max_prompt_tokens` caps prompts below the model's context; `max_batch_size` requests are decoded
        together, and at most `max_queue` wait (more are refused with `batching.QueueFullError`)."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = get_template(template) if isinstance(template, str) else template
        self.image_aspect_ratio = image_aspect_ratio
        self.name = name
        self.max_prompt_tokens = max_prompt_tokens
        self.scheduler = BatchScheduler(self, max_batch_size, max_queue)
        # No token spans more characters than the longest vocabulary entry: a text longer than limit x this cannot
        # fit and is refused without tokenizing it.
        self._max_token_chars = max(max((len(t) for t in tokenizer.get_vocab()), default=1), 1)

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
        image_aspect_ratio: str = DEFAULT_ASPECT_RATIO,
        **limits,
    ) -> InferenceEngine:
        """Load either checkpoint layout (see `exgra_med.serve.loading.load_model`) and wrap it. `template` defaults
        to the one the checkpoint was trained with, else `llava_med`; `limits` are the constructor's serving bounds.
        A transformers-native VLM folder gets a `exgra_med.vlm.serving.NativeInferenceEngine`."""
        from exgra_med.model.checkpoint import recorded_conv_template
        from exgra_med.serve.loading import load_model
        from exgra_med.vlm.detect import resolve_native

        native = resolve_native(path)
        if native is not None:
            from exgra_med.vlm.serving import NativeInferenceEngine

            return NativeInferenceEngine.load(path, native, vision_tower=vision_tower, template=template,
                                              load_4bit=load_4bit, load_8bit=load_8bit, device=device, dtype=dtype,
                                              image_aspect_ratio=image_aspect_ratio, **limits)

        template = template or recorded_conv_template(path) or "llava_med"
        model, tokenizer, processor = load_model(
            path, vision_tower=vision_tower, dtype=dtype, device=device, load_4bit=load_4bit, load_8bit=load_8bit
        )
        # A local folder is served under its name, a Hub id under the id itself (as vLLM does).
        name = (os.path.basename(os.path.normpath(path)) if os.path.exists(path) else path) or "exgra-med"
        return cls(model, tokenizer, processor, template=template, image_aspect_ratio=image_aspect_ratio, name=name,
                   **limits)

    @property
    def context_length(self) -> int | None:
        """The language model's context (`max_position_embeddings`), None when the config does not say."""
        config = getattr(self.model.config, "text_config", self.model.config)
        value = getattr(config, "max_position_embeddings", None)
        return int(value) if value else None

    def prompt_limit(self, settings: GenerationSettings) -> int | None:
        """The most prompt tokens a request with `settings` may have: the context minus the answer's tokens, and
        at most `max_prompt_tokens`."""
        limits = [] if self.context_length is None else [self.context_length - settings.max_new_tokens]
        if self.max_prompt_tokens is not None:
            limits.append(self.max_prompt_tokens)
        return min(limits) if limits else None

    def check_prompt_text(self, messages: Sequence[Message], settings: GenerationSettings,
                          system: str | None = None) -> None:
        """Refuse, before tokenizing, a conversation whose characters alone show it cannot fit `prompt_limit`."""
        limit = self.prompt_limit(settings)
        chars = sum(len(text) for _, text in messages) + len(system or "")
        if limit is not None and chars > max(limit, 0) * self._max_token_chars:
            raise PromptTooLongError(
                f"the conversation is too long: {chars} characters cannot fit in the {limit} prompt tokens allowed "
                f"({self._limit_reason(settings)})"
            )

    def _limit_reason(self, settings: GenerationSettings) -> str:
        parts = []
        if self.context_length is not None:
            parts.append(f"context {self.context_length} tokens minus max_tokens {settings.max_new_tokens}")
        if self.max_prompt_tokens is not None:
            parts.append(f"--max-prompt-tokens {self.max_prompt_tokens}")
        return "; ".join(parts)

    def check_prompt_ids(self, n_tokens: int, settings: GenerationSettings) -> None:
        """Refuse a prompt of `n_tokens` tokens (image tokens included) above `prompt_limit`."""
        limit = self.prompt_limit(settings)
        if limit is not None and n_tokens > limit:
            raise PromptTooLongError(
                f"the conversation is too long: {n_tokens} prompt tokens > {max(limit, 0)} allowed "
                f"({self._limit_reason(settings)})"
            )

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
    @property
    def eos_token_ids(self) -> set[int]:
        """The tokens that end an answer (the tokenizer's end of sequence)."""
        eos = self.tokenizer.eos_token_id
        return {eos} if eos is not None else set()

    def generate_rows(self, jobs: Sequence[Job], **generate_kwargs) -> None:
        """Decode `jobs` together: their prompts left padded, their images stacked (the batching worker's call)."""
        from exgra_med.eval.generate import left_pad

        tokenizer = self.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids, mask = left_pad([j.input_ids for j in jobs], pad_id)  # (B, T)
        images = [j.pixels for j in jobs if j.pixels is not None]
        pixels = torch.stack(images).to(self.device) if images else None  # (B_img, 3, H, W)
        self.model.generate(ids.to(self.device), pixels, mask.to(self.device), **generate_kwargs)

    def generate_kwargs(self, settings: GenerationSettings) -> dict:
        """`generate` keyword arguments for `settings` (greedy or sampled, stop string, pad/eos ids)."""
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

    def submit(
        self,
        messages: Sequence[Message],
        image: Image.Image | str | os.PathLike | None = None,
        settings: GenerationSettings | None = None,
        system: str | None = None,
    ) -> Job:
        """Check and encode the request, then queue it for batched decoding; read it with `job.pieces()`.

        Raises PromptTooLongError (before tokenizing when the text alone is too long), ImageLoadError, or
        `batching.QueueFullError` when the queue is full.
        """
        settings = settings or GenerationSettings()
        self.check_prompt_text(messages, settings, system)
        input_ids = self.encode(messages, has_image=image is not None, system=system)
        self.check_prompt_ids(int(input_ids.shape[1]), settings)
        pixels = self.preprocess(image)[0] if image is not None else None  # (3, H, W)
        job = Job(input_ids[0].tolist(), pixels, settings, self.template)
        return self.scheduler.submit(job)

    def stream(
        self,
        messages: Sequence[Message],
        image: Image.Image | str | os.PathLike | None = None,
        settings: GenerationSettings | None = None,
        system: str | None = None,
        info: GenerationInfo | None = None,
    ) -> Iterator[str]:
        """Yield the answer as text chunks while it is generated (cut at the template's stop string).

        `info`, when given, receives the token counts and the finish reason once the stream ends. Closing the
        generator early cancels the generation.
        """
        job = self.submit(messages, image, settings, system)
        try:
            yield from job.pieces()
        finally:
            job.cancel()
        if info is not None:
            info.prompt_tokens = len(job.input_ids)
            info.completion_tokens = len(job.generated)
            info.finish_reason = "length" if job.finish_reason == "length" else "stop"

    def close(self, wait: bool = True) -> None:
        """Cancel queued and running requests and stop the batching worker (waiting for it unless `wait=False`)."""
        self.scheduler.close(timeout=10.0 if wait else 0.0)

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
