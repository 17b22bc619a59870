"""The one inference helper behind chat, web and API: prompt building, image preprocessing, streamed generation.

A conversation is a list of (role, text) messages (`"human"` / `"gpt"`) ending with a human turn, plus
at most one image, attached to the first human turn as in LLaVA-Med. `<image>` in that turn marks where
the image goes; without it the image follows the question ("question\\n<image>", the training layout).
Concurrent callers (API requests, web users) are decoded together behind a bounded queue: by default with continuous
batching (`continuous.ContinuousScheduler`: requests join and leave the batch at every decoding step), or in static
batches (`batching.StaticScheduler`, `batching="static"`). Prompts are checked against the model's context and
`max_prompt_tokens` before any work (`PromptTooLongError`); a prompt far too long is refused from its length in
characters, before tokenizing it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from PIL import Image

from exgra_med.conversation import ConversationTemplate
from exgra_med.data.images import load_image
from exgra_med.errors import UserError
from exgra_med.model.auto import LoadOptions, load_backend
from exgra_med.model.backend import Backend, Message
from exgra_med.serve.batching import Job, Scheduler, StaticScheduler
from exgra_med.serve.continuous import ContinuousScheduler
from exgra_med.serve.options import BATCHING, DEFAULT_MAX_BATCH_TOKENS

logger = logging.getLogger(__name__)


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
    """A loaded model behind its back end (`exgra_med.model.backend.Backend`: prompt building, image inputs, end of
    an answer), with a bounded queue and batched decoding in front of it; one engine for every model family."""

    def __init__(
        self,
        backend: Backend,
        name: str = "exgra-med",
        max_prompt_tokens: int | None = None,
        max_batch_size: int = 8,
        max_queue: int = 32,
        batching: str = "continuous",
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    ):
        """`max_prompt_tokens` caps prompts below the model's context; `max_batch_size` requests are decoded
        together, and at most `max_queue` wait (more are refused with `batching.QueueFullError`). `batching` is
        "continuous" (at most `max_batch_tokens` prompt tokens join per step) or "static"."""
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {', '.join(BATCHING)}, got {batching!r}")
        self.backend = backend.eval()
        self.name = name
        self.max_prompt_tokens = max_prompt_tokens
        self.scheduler: Scheduler = (
            ContinuousScheduler(self, max_batch_size, max_queue, max_batch_tokens) if batching == "continuous"
            else StaticScheduler(self, max_batch_size, max_queue))
        # No token spans more characters than the longest vocabulary entry: a text longer than limit x this cannot
        # fit and is refused without tokenizing it.
        self._max_token_chars = max(max((len(t) for t in self.tokenizer.get_vocab()), default=1), 1)

    @classmethod
    def from_path(cls, path: str, options: LoadOptions | None = None, **limits) -> InferenceEngine:
        """Load any model (`exgra_med.model.auto.load_backend`; the prompt template defaults to the one the checkpoint
        was trained with, else `llava_med`) and wrap it; `limits` are the constructor's serving bounds."""
        backend = load_backend(path, options, default_template="llava_med")
        # A local folder is served under its name, a Hub id under the id itself (as vLLM does).
        name = (os.path.basename(os.path.normpath(path)) if os.path.exists(path) else path) or "exgra-med"
        return cls(backend, name=name, **limits)

    # --- the back end's parts, for callers that read them ---------------------------------------------------
    @property
    def model(self):
        return self.backend.model

    @property
    def tokenizer(self):
        return self.backend.tokenizer

    @property
    def template(self) -> ConversationTemplate:
        """The template answers are cut with (its stop string and role prefix)."""
        return self.backend.answer_template

    @property
    def context_length(self) -> int | None:
        """The language model's context (`max_position_embeddings`), None when the config does not say."""
        return self.backend.context_length

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

    # --- prompt ------------------------------------------------------------------------------------------
    def build_prompt(self, messages: Sequence[Message], has_image: bool, system: str | None = None) -> str:
        """The full prompt text, image tokens expanded. `system` replaces the template's system prompt (e.g. an API
        request's system message)."""
        return self.backend.prompt_text(messages, has_image, system)

    # --- generation --------------------------------------------------------------------------------------
    @property
    def eos_token_ids(self) -> set[int]:
        """The tokens that end an answer."""
        return self.backend.eos_token_ids

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
        if image is not None and not isinstance(image, Image.Image):
            image = load_image(image)
        prompt = self.backend.encode_conversation(messages, image, system)
        self.check_prompt_ids(len(prompt.input_ids), settings)
        return self.scheduler.submit(Job(prompt, settings, self.template))

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
