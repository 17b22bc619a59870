"""Retry policy for remote API calls: which errors to retry, exponential backoff with jitter, Retry-After.

Errors fall in three classes (see `classify`):
- retryable: 429, 408, 409, 5xx, timeouts, connection errors, response bodies that are not JSON, and
  replies that fail validation (`InvalidReply`); retried up to `max_attempts` times per request;
- item errors: other 4xx (e.g. a prompt too long for the model); the item fails at once;
- fatal: 401 / 403 / 404 (bad key, no access, unknown model): every item would fail, so the run stops.
"""

from __future__ import annotations

import email.utils
import json
import os
import random
import threading
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any


class InvalidReply(Exception):
    """The endpoint answered, but the reply does not have the required shape; worth another attempt."""


class FatalApiError(RuntimeError):
    """An error that every further request would repeat (bad key, unknown model): stop the run."""


class ErrorKind(Enum):
    """How to react to an exception raised by one request."""

    RETRY = "retry"
    ITEM = "item"
    FATAL = "fatal"


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={value!r} is not a number") from e


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and jitter; defaults can be set from the environment."""

    max_attempts: int = 6
    """Attempts per request, the first included (env `EXGRA_MED_API_MAX_ATTEMPTS`)."""
    base_delay: float = 1.0
    """Backoff before the second attempt, doubled each time, in seconds (env `EXGRA_MED_API_BASE_DELAY`)."""
    max_delay: float = 60.0
    """Cap of the exponential backoff, in seconds (env `EXGRA_MED_API_MAX_DELAY`)."""
    max_retry_after: float = 600.0
    """Longest Retry-After that is honoured; longer requests fail the attempt budget instead."""
    seed: int = 0
    """Seed of the jitter generator."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError(f"delays must be >= 0, got base {self.base_delay}, max {self.max_delay}")

    @classmethod
    def from_env(cls, **overrides: Any) -> RetryPolicy:
        """Defaults overridden by `EXGRA_MED_API_*` variables, then by non-None keyword overrides."""
        values: dict[str, Any] = {
            "max_attempts": int(_env_float("EXGRA_MED_API_MAX_ATTEMPTS", cls.max_attempts)),
            "base_delay": _env_float("EXGRA_MED_API_BASE_DELAY", cls.base_delay),
            "max_delay": _env_float("EXGRA_MED_API_MAX_DELAY", cls.max_delay),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def backoff(self, retry_index: int, rng: random.Random) -> float:
        """Delay before retry number `retry_index` (1-based): half fixed, half uniform jitter."""
        delay = min(self.max_delay, self.base_delay * (2 ** (retry_index - 1)))
        return delay / 2 + rng.uniform(0, delay / 2)


def _status_code(exc: BaseException) -> int | None:
    code = getattr(exc, "status_code", None)
    return code if isinstance(code, int) else None


def classify(exc: BaseException) -> ErrorKind:
    """Decide whether `exc` (from the openai client or from reply validation) is retried."""
    # lazy: openai is optional (the api extra)
    import openai

    retryable = (
        InvalidReply,
        openai.APIConnectionError,
        openai.APIResponseValidationError,
        json.JSONDecodeError,
    )
    if isinstance(exc, retryable):
        return (
            ErrorKind.RETRY
        )  # APITimeoutError is an APIConnectionError; JSONDecodeError: an HTML error page
    code = _status_code(exc)
    if code is not None:
        if code in (408, 409, 429) or code >= 500:
            return ErrorKind.RETRY
        if code in (401, 403, 404):
            return ErrorKind.FATAL
        return ErrorKind.ITEM
    return ErrorKind.FATAL  # an unexpected exception is a bug: stop rather than burn the budget


def retry_after_seconds(exc: BaseException, now: float | None = None) -> float | None:
    """Seconds asked for by a `Retry-After` (seconds or HTTP date) or `retry-after-ms` header, if any."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class Throttle:
    """A pause shared by all workers: after a 429 with Retry-After nobody sends before it expires."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._not_before = 0.0

    def pause_for(self, seconds: float) -> None:
        """Make every worker wait at least `seconds` from now before its next request."""
        with self._lock:
            self._not_before = max(self._not_before, time.monotonic() + seconds)

    def wait(self, stop: threading.Event) -> None:
        """Block until the shared pause has expired or `stop` is set."""
        while not stop.is_set():
            with self._lock:
                remaining = self._not_before - time.monotonic()
            if remaining <= 0:
                return
            stop.wait(remaining)
