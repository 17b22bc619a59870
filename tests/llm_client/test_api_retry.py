"""Retry policy: backoff bounds and seeding, Retry-After parsing, error classification."""

from __future__ import annotations

import email.utils
import json
import random
from types import SimpleNamespace

import pytest

from exgra_med.llm_client.retry import ErrorKind, InvalidReply, RetryPolicy, classify, retry_after_seconds


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=5.0)
    rng = random.Random(0)
    delays = [policy.backoff(i, rng) for i in range(1, 6)]
    nominal = [1.0, 2.0, 4.0, 5.0, 5.0]
    for d, n in zip(delays, nominal):
        assert n / 2 <= d <= n
    again = random.Random(0)
    assert [policy.backoff(i, again) for i in range(1, 6)] == delays  # seeded: reproducible


def test_policy_from_env_and_validation(monkeypatch) -> None:
    monkeypatch.setenv("EXGRA_MED_API_BASE_DELAY", "0.01")
    monkeypatch.setenv("EXGRA_MED_API_MAX_ATTEMPTS", "3")
    policy = RetryPolicy.from_env(max_delay=0.5, base_delay=None)
    assert (policy.base_delay, policy.max_attempts, policy.max_delay) == (0.01, 3, 0.5)
    monkeypatch.setenv("EXGRA_MED_API_MAX_DELAY", "soon")
    with pytest.raises(ValueError, match="EXGRA_MED_API_MAX_DELAY"):
        RetryPolicy.from_env()
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


def _exc_with_headers(headers: dict[str, str]) -> Exception:
    exc = Exception("x")
    exc.response = SimpleNamespace(headers=headers)  # type: ignore[attr-defined]
    return exc


def test_retry_after_forms() -> None:
    assert retry_after_seconds(_exc_with_headers({"retry-after": "3"})) == 3.0
    assert retry_after_seconds(_exc_with_headers({"retry-after-ms": "250"})) == 0.25
    date = email.utils.formatdate(1_000_010, usegmt=True)
    assert retry_after_seconds(_exc_with_headers({"retry-after": date}), now=1_000_000) == pytest.approx(10.0)
    assert retry_after_seconds(_exc_with_headers({"retry-after": "soon"})) is None
    assert retry_after_seconds(_exc_with_headers({})) is None
    assert retry_after_seconds(ValueError("no response")) is None


class _Status(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"status {code}")
        self.status_code = code


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (InvalidReply("no revision"), ErrorKind.RETRY),
        (json.JSONDecodeError("bad", "<html>", 0), ErrorKind.RETRY),
        (_Status(429), ErrorKind.RETRY),
        (_Status(500), ErrorKind.RETRY),
        (_Status(503), ErrorKind.RETRY),
        (_Status(408), ErrorKind.RETRY),
        (_Status(400), ErrorKind.ITEM),
        (_Status(422), ErrorKind.ITEM),
        (_Status(401), ErrorKind.FATAL),
        (_Status(404), ErrorKind.FATAL),
        (KeyError("bug"), ErrorKind.FATAL),
    ],
)
def test_classify(exc: Exception, kind: ErrorKind) -> None:
    assert classify(exc) is kind
