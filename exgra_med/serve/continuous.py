"""Continuous (iteration-level) batching, as vLLM and TGI do it: rows join and leave the batch at every decoding step.

The worker keeps the running rows' KV cache (`exgra_med.model.backend.DecodeState`, one per batch, rows left padded).
Each step it decodes one token for every running row (`Backend.decode_step`), then prefills the waiting jobs that fit
(`Backend.prefill`) and merges their rows into the batch; rows whose job ended (end of sequence, stop string, token
limit, cancellation) leave it at once. The prefill of joining prompts counts against `max_batch_tokens` per step,
together with one token per running row, so that a burst of long prompts does not stall the running rows for long; a
prompt longer than the whole budget is prefilled alone in its step. Rows with different sampling settings share a step:
each row is greedy or sampled with its own temperature and top-p, through the logits processors and warpers `generate`
would build for it (the model's generation config included: repetition penalty, top-k, ...).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from exgra_med.model.backend import DecodeState
from exgra_med.serve.batching import Job, RowMinTokens, Scheduler, accept_token, fail_job, finish_job
from exgra_med.serve.options import DEFAULT_MAX_BATCH_TOKENS

logger = logging.getLogger(__name__)


def next_tokens(logits: torch.Tensor, jobs: Sequence[Job], eos_ids: set[int], backend) -> torch.Tensor:
    """Each row's next token (B,) from its logits (B, V): the end of sequence held back below the row's
    `min_new_tokens`, then the row's own processors as `generate` would run them (`Backend.step_processors`: the
    model's generation config and, when sampling, the row's temperature and top-p warpers); greedy or sampled."""
    scores = RowMinTokens(list(jobs), eos_ids)(None, logits)
    tokens = scores.argmax(-1)  # (B,): greedy rows without processors keep theirs
    for i, job in enumerate(jobs):
        if job.processors is None:  # built once per job
            job.processors = backend.step_processors(job.prompt, job.settings.temperature, job.settings.top_p)
        if not job.processors and job.settings.temperature == 0:
            continue
        history = torch.tensor([backend.generation_history(job.prompt, job.generated)], device=scores.device)
        row = job.processors(history, scores[i:i + 1])  # (1, V)
        if job.settings.temperature > 0:
            tokens[i] = torch.multinomial(row.softmax(-1), 1)[0, 0]
        else:
            tokens[i] = row.argmax(-1)[0]
    return tokens


class ContinuousScheduler(Scheduler):
    """Decodes jobs with iteration-level batching (see the module docstring)."""

    def __init__(self, engine, max_batch_size: int = 8, max_queue: int = 32,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS):
        super().__init__(engine, max_batch_size, max_queue)
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.max_batch_tokens = max_batch_tokens
        self.largest_batch = 0  # most rows decoded in one step (for tests, logs and the benchmark)

    def _admit(self, running: int) -> list[Job] | None:
        """The waiting jobs that join at this step, oldest first, within the row and token budgets; waits for work
        when no row runs; None once the server closes."""
        with self._cond:
            while not running and not self._waiting and not self._closing.is_set():
                self._cond.wait()
            if self._closing.is_set():
                return None
            budget, joining = self.max_batch_tokens - running, []
            while self._waiting and running + len(joining) < self.max_batch_size:
                job = self._waiting[0]
                if job.cancelled.is_set():
                    finish_job(self._waiting.pop(0), "cancelled")
                    continue
                if len(job.input_ids) > budget and joining:
                    break  # first come, first served: later jobs wait behind it; alone, it may exceed the budget
                joining.append(self._waiting.pop(0))
                budget -= len(job.input_ids)
        if joining:
            self.batch_sizes.append(len(joining))
        return joining

    def _loop(self) -> None:
        rows: list[Job] = []
        state: DecodeState | None = None
        pending: torch.Tensor | None = None  # (B,) each running row's last token, fed at the next step
        while True:
            joining = self._admit(len(rows))
            if joining is None:  # closing: running rows end as the static scheduler's do, queued ones were failed
                for job in rows:
                    finish_job(job, "length")
                return
            try:
                rows, state, pending = self._step(rows, state, pending, joining)
            except Exception as e:  # noqa: BLE001 - merging the rows failed: their consumers re-raise it
                logger.exception("continuous batching failed for %d rows", len(rows) + len(joining))
                for job in rows + joining:
                    fail_job(job, e)
                rows, state, pending = [], None, None
            self.largest_batch = max(self.largest_batch, len(rows))

    @torch.inference_mode()
    def _step(self, rows: list[Job], state: DecodeState | None, pending: torch.Tensor | None,
              joining: list[Job]) -> tuple[list[Job], DecodeState | None, torch.Tensor | None]:
        """One token for every running row, then the first token of every joining one; returns the rows still
        running, their merged state and their next input tokens."""
        backend = self.engine.backend
        parts: list[tuple[list[Job], DecodeState, torch.Tensor]] = []
        if rows:
            try:
                logits = backend.decode_step(state, pending)
                parts.append((rows, state, self._pick(rows, logits)))
            except Exception as e:  # noqa: BLE001 - handed to every consumer of these rows, which re-raises it
                logger.exception("decoding failed for %d rows", len(rows))
                for job in rows:
                    fail_job(job, e)
        if joining:
            try:
                logits, joined = backend.prefill([j.prompt for j in joining])
                parts.append((joining, joined, self._pick(joining, logits)))
            except Exception as e:  # noqa: BLE001 - as above; the running rows go on
                logger.exception("prefill failed for %d joining rows", len(joining))
                for job in joining:
                    fail_job(job, e)
        kept_rows, states, tokens = [], [], []
        for jobs, part, picked in parts:
            keep = [i for i, job in enumerate(jobs) if not job.done]
            if not keep:
                continue
            if len(keep) < len(jobs):
                part, picked = part.select(keep), picked[keep]
            kept_rows += [jobs[i] for i in keep]
            states.append(part)
            tokens.append(picked)
        if not states:
            return [], None, None
        merged = states[0] if len(states) == 1 else DecodeState.concat(states)
        return kept_rows, merged, torch.cat(tokens)

    def _pick(self, jobs: list[Job], logits: torch.Tensor) -> torch.Tensor:
        """Choose and hand out each row's next token (B,); cancelled rows end without one."""
        backend = self.engine.backend
        eos_ids = set(backend.eos_token_ids)
        for job in jobs:
            if job.cancelled.is_set():
                finish_job(job, "cancelled")
        tokens = next_tokens(logits, jobs, eos_ids, backend)
        for job, token in zip(jobs, tokens.tolist()):
            if not job.done:
                accept_token(job, token, backend.tokenizer, eos_ids)
        return tokens
