"""Continuous request batching for serving: concurrent requests share one `generate` call, with a bounded queue.

Every caller (API request, web user, terminal) submits a `Job` and reads its text pieces from the job's own queue.
One worker thread takes up to `max_batch_size` waiting jobs with the same sampling settings, left pads their prompts
and decodes them together with the KV cache (the back end's `generate`); each row streams through its own
`AnswerFilter` and stops on its own (stop string, end of sequence, its token limit, or cancellation), so a batch of 8
costs about one long answer. More than `max_queue` waiting jobs is refused (`QueueFullError`, HTTP 429). `close()`
cancels everything within one decoding step.

For serving at scale, export the model with `exgra-med export-hf` and use vLLM or SGLang.
"""

from __future__ import annotations

import logging
import queue
import threading
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
                _finish(job, "cancelled")
                continue
            if token in self.eos_ids:
                job.generated.append(token)
                _finish(job, "stop")
                continue
            job.generated.append(token)
            if len(job.generated) >= job.settings.min_new_tokens:
                job.answer.arm()  # the stop string counts from this token on
            job._decoded = text = self.tokenizer.decode(job.generated, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # an incomplete UTF-8 character waits for its next token
                _show(job)
            if job.answer.stopped:
                _finish(job, "stop")
            elif len(job.generated) >= job.settings.max_new_tokens:
                _finish(job, "length")

    def end(self) -> None:
        for job in self.jobs:
            if not job.done:
                _finish(job, "length")


class _RowsDone(StoppingCriteria):
    """Per-row stop flags for `generate`: a row stops once its job is done or cancelled (or the server closes)."""

    def __init__(self, jobs: list[Job], closing: threading.Event):
        self.jobs, self.closing = jobs, closing

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        stop = self.closing.is_set()
        flags = [stop or job.done or job.cancelled.is_set() for job in self.jobs]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


class _RowMinTokens(LogitsProcessor):
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


def _show(job: Job) -> None:
    piece = job.answer.push(job._decoded[job._shown:])
    job._shown = len(job._decoded)
    if piece:
        job.events.put(piece)


def _finish(job: Job, reason: str) -> None:
    if job.done:
        return
    if len(job._decoded) > job._shown:
        _show(job)
    tail = job.answer.finish()
    if tail:
        job.events.put(tail)
    job.finish_reason, job.done = reason, True
    job.events.put(_END)


def _fail(job: Job, error: BaseException) -> None:
    if not job.done:
        job.done = True
        job.events.put(error)


class BatchScheduler:
    """Queues jobs and decodes them in batches on one worker thread (see the module docstring)."""

    def __init__(self, engine, max_batch_size: int = 8, max_queue: int = 32):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError(f"max_batch_size and max_queue must be >= 1, got {max_batch_size}, {max_queue}")
        self.engine, self.max_batch_size, self.max_queue = engine, max_batch_size, max_queue
        self._waiting: list[Job] = []
        self._cond = threading.Condition()
        self._closing = threading.Event()
        self._worker: threading.Thread | None = None
        self.batch_sizes: list[int] = []  # size of every batch run (for tests and logs)

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
            _fail(job, ServerClosingError("the server is shutting down"))
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout)

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
                _finish(job, "cancelled")
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
                    _fail(job, e)
            if self._closing.is_set():
                for job in batch:
                    _fail(job, ServerClosingError("the server is shutting down"))

    @torch.inference_mode()
    def _run(self, jobs: list[Job]) -> None:
        engine = self.engine
        kwargs = engine.generate_kwargs(jobs[0].settings)
        kwargs["max_new_tokens"] = max(j.settings.max_new_tokens for j in jobs)
        eos_ids = set(engine.eos_token_ids)
        streamer = _RowStreamer(jobs, engine.tokenizer, eos_ids)
        criteria = StoppingCriteriaList([_RowsDone(jobs, self._closing)])
        if any(j.settings.min_new_tokens for j in jobs):
            kwargs["logits_processor"] = LogitsProcessorList([_RowMinTokens(jobs, eos_ids)])
        engine.generate_rows(jobs, streamer=streamer, stopping_criteria=criteria, **kwargs)
        streamer.end()
