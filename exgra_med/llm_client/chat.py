"""One chat-completion request whose reply is validated by a parser; failures become retries."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, TypeVar

from exgra_med.llm_client.retry import InvalidReply
from exgra_med.llm_client.runner import ItemContext

T = TypeVar("T")
_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.DOTALL)


def parse_json_object(content: str) -> dict:
    """Parse a reply that should be one JSON object; tolerates a Markdown code fence around it.

    Raises `InvalidReply` (which is retried) when no JSON object can be read.
    """
    text = content.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        start, end = text.find("{"), text.rfind("}")
        try:
            value = json.loads(text[start : end + 1]) if 0 <= start < end else None
        except json.JSONDecodeError:
            value = None
        if value is None:
            raise InvalidReply(f"reply is not JSON: {text[:80]!r}") from None
    if not isinstance(value, dict):
        raise InvalidReply(f"reply is JSON but not an object: {type(value).__name__}")
    return value


def chat_request(
    ctx: ItemContext,
    client: Any,
    model: str,
    messages: list[dict[str, str]],
    parse: Callable[[str], T],
    **create_kwargs: Any,
) -> T:
    """Send `messages` and return `parse(reply text)`, retrying per the run's policy.

    Tokens of every response are counted, including replies that `parse` rejects.
    """

    def attempt() -> T:
        response = client.chat.completions.create(model=model, messages=messages, **create_kwargs)
        usage = getattr(response, "usage", None)
        if usage is not None and getattr(usage, "total_tokens", None):
            ctx.add_tokens(int(usage.total_tokens))
        choices = getattr(response, "choices", None) or []
        content = choices[0].message.content if choices else None
        if not content or not content.strip():
            raise InvalidReply("empty reply")
        return parse(content)

    return ctx.call(attempt)
