"""Request batching for serving: the queue every request goes through, and the static scheduler.

Every caller (API request, web user, terminal) submits a `Job` and reads its text pieces from the job's own queue. A
`Scheduler` holds the waiting jobs (more than `max_queue` are refused: `QueueFullError`, HTTP 429) and decodes them on
one worker thread, at most `max_batch_size` rows at once; each row streams through its own `AnswerFilter` and stops on
its own (stop string, end of sequence, its token limit, or cancellation). `close()` cancels everything within one
decoding step. Two schedulers share this frame:

- `exgra_med.serve.continuous.ContinuousScheduler` (the default): iteration-level batching, as vLLM and TGI do:
  finished rows leave the batch and waiting requests join at the next decoding step.
- `StaticScheduler` (here): up to `max_batch_size` waiting jobs with the same sampling settings are left padded and
  decoded together by the back end's `generate`; new jobs are taken only when the whole batch has ended.

For serving at scale, export the model with `exgra-med export-hf` and use vLLM or SGLang.
"""

from __future__ import annotations

import logging
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from exgra_med.conversation import ConversationTemplate
from exgra_med.model.backend import Prompt
from exgra_med.serve.streaming import AnswerFilter

logger = logging.getLogger(__name__)

_END = object()


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the caller should retry later (HTTP 429)."""


class ServerClosingError(RuntimeError):
    """The server is stopping; the request was cancelled (HTTP 503)."""


@dataclass(eq=False)  # jobs compare by identity
class Job:
    """One request: its encoded prompt (`exgra_med.model.backend.Prompt`: ids and image inputs), decoding settings;
    its output arrives in `events`."""

    prompt: Prompt
    settings: object  # GenerationSettings (engine.py imports this module)
    template: ConversationTemplate
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    finish_reason: str = "stop"
    done: bool = False
    processors: object = None  # continuous batching: the row's LogitsProcessorList, built at its first token

    def __post_init__(self):
        self.answer = AnswerFilter(self.template, armed=not self.settings.min_new_tokens)
        self._shown = 0  # characters of the decoded tokens already handed to the filter
        self._decoded = ""  # the generated tokens, decoded

    @property
    def input_ids(self) -> list[int]:
        """The prompt's token ids (image tokens included)."""
        return self.prompt.input_ids

    @property
    def sampling_key(self) -> tuple[float, float]:
        """Jobs decode in one batch only with equal sampling settings."""
        return (self.settings.temperature, self.settings.top_p if self.settings.temperature > 0 else 1.0)

    def cancel(self) -> None:
        """Stop generating for this job (its consumer went away); its row stops at the next decoding step."""
        self.cancelled.set()

    def next_piece(self, timeout: float | None = None) -> str | None:
        """The next text piece, or None once the answer is complete; raises the error that ended generation, and
        `queue.Empty` when nothing came within `timeout` seconds."""
        item = self.events.get(timeout=timeout)
        if item is _END:
            self.events.put(_END)  # stays complete for later calls
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def pieces(self) -> Iterator[str]:
        """The answer's text pieces as they are generated; raises the error that ended generation, if any."""
        while (piece := self.next_piece()) is not None:
            yield piece


class _RowStreamer(BaseStreamer):
    """Receives each decoding step's tokens (B,) and routes them to the jobs' filters, ending rows that are done."""

    def __init__(self, jobs: list[Job], tokenizer, eos_ids: set[int]):
        self.jobs, self.tokenizer, self.eos_ids = jobs, tokenizer, eos_ids

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1:  # the prompt (empty when generating from embeddings)
            return
        for job, token in zip(self.jobs, value.tolist()):
            if job.done:
                continue
            if job.cancelled.is_set():  # its row was stopped at the previous step: this token is padding
                finish_job(job, "cancelled")
                continue
            accept_token(job, token, self.tokenizer, self.eos_ids)

    def end(self) -> None:
        for job in self.jobs:
            if not job.done:
                finish_job(job, "length")


class _RowsDone(StoppingCriteria):
    """Per-row stop flags for `generate`: a row stops once its job is done or cancelled (or the server closes)."""

    def __init__(self, jobs: list[Job], closing: threading.Event):
        self.jobs, self.closing = jobs, closing

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        stop = self.closing.is_set()
        flags = [stop or job.done or job.cancelled.is_set() for job in self.jobs]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


class RowMinTokens(LogitsProcessor):
    """Per-row `min_new_tokens`: the end-of-sequence token cannot be chosen by a row whose job has generated fewer
    tokens than its minimum (transformers' MinNewTokensLengthLogitsProcessor applies one minimum to the batch)."""

    def __init__(self, jobs: list[Job], eos_ids: set[int]):
        self.jobs, self.eos_ids = jobs, sorted(eos_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = [i for i, job in enumerate(self.jobs) if len(job.generated) < job.settings.min_new_tokens]
        if rows and self.eos_ids:
            scores = scores.clone()
            scores[torch.tensor(rows, device=scores.device)[:, None],
                   torch.tensor(self.eos_ids, device=scores.device)] = float("-inf")
        return scores


def accept_token(job: Job, token: int, tokenizer, eos_ids: set[int]) -> None:
    """Append a generated token to `job`: stream its text through the job's filter and end the job on end of
    sequence, its stop string or its token limit."""
    job.generated.append(token)
    if token in eos_ids:
        finish_job(job, "stop")
        return
    if len(job.generated) >= job.settings.min_new_tokens:
        job.answer.arm()  # the stop string counts from this token on
    job._decoded = text = tokenizer.decode(job.generated, skip_special_tokens=True)
    if not text.endswith("\ufffd"):  # an incomplete UTF-8 character waits for its next token
        _show(job)
    if job.answer.stopped:
        finish_job(job, "stop")
    elif len(job.generated) >= job.settings.max_new_tokens:
        finish_job(job, "length")


def _show(job: Job) -> None:
    piece = job.answer.push(job._decoded[job._shown:])
    job._shown = len(job._decoded)
    if piece:
        job.events.put(piece)


def finish_job(job: Job, reason: str) -> None:
    """End `job` with `reason` ("stop", "length", "cancelled"): the filter's held-back text, then the end marker."""
    if job.done:
        return
    if len(job._decoded) > job._shown:
        _show(job)
    tail = job.answer.finish()
    if tail:
        job.events.put(tail)
    job.finish_reason, job.done = reason, True
    job.events.put(_END)


def fail_job(job: Job, error: BaseException) -> None:
    """End `job` with `error`, which its consumer re-raises."""
    if not job.done:
        job.done = True
        job.events.put(error)


class Scheduler(ABC):
    """The queue in front of one worker thread that decodes jobs (see the module docstring); subclasses decode."""

    def __init__(self, engine, max_batch_size: int = 8, max_queue: int = 32):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError(f"max_batch_size and max_queue must be >= 1, got {max_batch_size}, {max_queue}")
        self.engine, self.max_batch_size, self.max_queue = engine, max_batch_size, max_queue
        self._waiting: list[Job] = []
        self._cond = threading.Condition()
        self._closing = threading.Event()
        self._worker: threading.Thread | None = None
        self.batch_sizes: list[int] = []  # jobs started together, per prefill (for tests and logs)

    def submit(self, job: Job) -> Job:
        """Queue `job`; raises QueueFullError when `max_queue` jobs already wait, ServerClosingError after close."""
        with self._cond:
            if self._closing.is_set():
                raise ServerClosingError("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"server busy: {len(self._waiting)} requests already waiting; retry later")
            self._waiting.append(job)
            if self._worker is None:
                self._worker = threading.Thread(target=self._loop, name="exgra-med-batcher", daemon=True)
                self._worker.start()
            self._cond.notify()
        return job

    def close(self, timeout: float = 10.0) -> None:
        """Cancel waiting and running jobs and stop the worker (running rows stop at their next decoding step)."""
        with self._cond:
            self._closing.set()
            waiting, self._waiting = self._waiting, []
            self._cond.notify_all()
        for job in waiting:
            fail_job(job, ServerClosingError("the server is shutting down"))
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout)

    @abstractmethod
    def _loop(self) -> None:
        """The worker: decode submitted jobs until `close()`."""


class StaticScheduler(Scheduler):
    """Decodes waiting jobs with equal sampling settings in one `generate` call; the next batch starts when the
    whole batch has ended (the `--batching static` baseline)."""

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._waiting and not self._closing.is_set():
                self._cond.wait()
            if self._closing.is_set():
                return None
            key = self._waiting[0].sampling_key
            batch = [j for j in self._waiting if j.sampling_key == key][: self.max_batch_size]
            taken = {id(j) for j in batch}
            self._waiting = [j for j in self._waiting if id(j) not in taken]
        live = []
        for job in batch:
            if job.cancelled.is_set():
                finish_job(job, "cancelled")
            else:
                live.append(job)
        return live

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            try:
                self._run(batch)
            except Exception as e:  # noqa: BLE001 - handed to every consumer of the batch, which re-raises it
                logger.exception("generation failed for a batch of %d", len(batch))
                for job in batch:
                    fail_job(job, e)
            if self._closing.is_set():
                for job in batch:
                    fail_job(job, ServerClosingError("the server is shutting down"))

    @torch.inference_mode()
    def _run(self, jobs: list[Job]) -> None:
        backend = self.engine.backend
        eos_ids = set(backend.eos_token_ids)
        streamer = _RowStreamer(jobs, backend.tokenizer, eos_ids)
        # Each row's AnswerFilter finds the stop string: these criteria replace the back end's StopOnString.
        overrides = {"streamer": streamer, "stopping_criteria": StoppingCriteriaList([_RowsDone(jobs, self._closing)])}
        if any(j.settings.min_new_tokens for j in jobs):
            overrides["logits_processor"] = LogitsProcessorList([RowMinTokens(jobs, eos_ids)])
        settings = jobs[0].settings
        kwargs = backend.generate_kwargs(max(j.settings.max_new_tokens for j in jobs), settings.temperature,
                                         settings.top_p, **overrides)
        backend.generate([j.prompt for j in jobs], **kwargs)
        streamer.end()
