"""Cleaning streamed text on the fly, so that streamed answers equal `ConversationTemplate.clean_answer`.

Generated text may run past the answer into the next turn ("... ###") and, with the `simple` template,
start with the role name ("Assistant: ..."). Streaming must never show text that a later chunk reveals
to be part of the stop string or of the role prefix; `AnswerFilter` holds such text back until it knows.
"""

from __future__ import annotations

from exgra_med.conversation import ConversationTemplate


def _partial_suffix(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop` (text that may become `stop`)."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


class AnswerFilter:
    """Feed raw decoded chunks with `push`; it returns the new displayable text; `finish` flushes the rest.

    The concatenation of everything returned equals `template.clean_answer(raw_text)`. With `armed=False` the stop
    string is not looked for until `arm()` (a request's `min_tokens`: as in vLLM, no stop before the minimum); it is
    then looked for in the text that arrives after that point.
    """

    def __init__(self, template: ConversationTemplate, armed: bool = True):
        self.stop = template.stop_str
        self.prefix = f"{template.roles[1]}:" if template.roles[1] else ""
        self._raw = ""
        self._emitted = ""
        self.stopped = False
        self._stop_from: int | None = 0 if armed else None  # where in the raw text the stop string is looked for

    def arm(self) -> None:
        """Look for the stop string from here on."""
        if self._stop_from is None:
            self._stop_from = len(self._raw)

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return self._emitted

    def _visible(self, final: bool) -> str:
        raw = self._raw
        stop = self.stop if self._stop_from is not None else ""
        idx = raw.find(stop, self._stop_from) if stop else -1
        if idx >= 0:
            raw, final = raw[:idx], True
            self.stopped = True
        elif not final and stop:
            raw = raw[: len(raw) - _partial_suffix(raw, self.stop)]
        text = raw.lstrip()
        if self.prefix:
            if text.startswith(self.prefix):
                text = text[len(self.prefix):].lstrip()
            elif not final and self.prefix.startswith(text):
                return ""  # may still turn out to be the role prefix
        # Trailing whitespace is held back: clean_answer strips it at the end.
        return text.strip() if final else text.rstrip()

    def _advance(self, final: bool) -> str:
        visible = self._visible(final)
        if not visible.startswith(self._emitted):
            # Cannot happen for monotone growth of `raw`; keep the stream consistent rather than repeat text.
            return ""
        new = visible[len(self._emitted):]
        self._emitted = visible
        return new

    def push(self, chunk: str) -> str:
        """Add a raw chunk; returns the text that is now safe to show (possibly empty)."""
        if self.stopped:
            return ""
        self._raw += chunk
        return self._advance(final=False)

    def finish(self) -> str:
        """End of generation: returns whatever was still held back."""
        if self.stopped:
            return ""
        out = self._advance(final=True)
        self.stopped = True
        return out
