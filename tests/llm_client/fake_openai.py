"""A real OpenAI-compatible HTTP server on 127.0.0.1 that injects faults, for the API tool tests.

Each request is attributed to an item key found as `[[key]]` in the last user message. A plan maps
keys to the actions of their successive requests; once the list is used up the server answers "ok".
Actions: "ok", "429:<retry-after>", "500", "503", "400", "401", "timeout:<seconds>" (sleep, then ok),
"malformed" (reply text is not JSON), "norevision", "toolong", "badscore", "garbage" (HTTP body not JSON).
Used in-process (a thread) by the tests; `python fake_openai.py PLAN.json` runs it standalone and
prints its base URL.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

KEY = re.compile(r"\[\[(.+?)\]\]")
USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


def extend_reply(key: str, user: str) -> str:
    """A valid extended-caption reply that names the item."""
    return json.dumps({"explanation": "too short", "revision": f"Extended answer for [[{key}]]."})


def judge_reply(scores: dict[str, str]) -> Callable[[str, str], str]:
    """Judge replies: `scores[key]` (default "8 6") on the first line, then an explanation."""
    return lambda key, user: f"{scores.get(key, '8 6')}\nAssistant 1 is more detailed."


class FakeOpenAI:
    """Threaded fake endpoint; `requests` records (key, action, time, authorization) per request."""

    def __init__(
        self,
        plan: dict[str, list[str]] | None = None,
        reply: Callable[[str, str], str] = extend_reply,
        delay: float = 0.0,
    ) -> None:
        self.plan = {k: list(v) for k, v in (plan or {}).items()}
        self.reply = reply
        self.delay = delay
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        """Root URL to give the client (`.../v1`)."""
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def count(self, key: str) -> int:
        """How many requests were made for `key`."""
        return sum(1 for r in self.requests if r["key"] == key)

    def counts(self) -> Counter:
        """Requests per key."""
        return Counter(r["key"] for r in self.requests)

    def times(self, key: str) -> list[float]:
        """Arrival times of the requests for `key`."""
        return [r["t"] for r in self.requests if r["key"] == key]

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _next_action(self, key: str) -> str:
        with self.lock:
            actions = self.plan.get(key)
            return actions.pop(0) if actions else "ok"

    def _handler(self) -> type:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
                match = KEY.search(user)
                key = match.group(1) if match else "?"
                action = fake._next_action(key)
                with fake.lock:
                    fake.requests.append(
                        {
                            "key": key,
                            "action": action,
                            "t": time.monotonic(),
                            "authorization": self.headers.get("Authorization", ""),
                        }
                    )
                if fake.delay:
                    time.sleep(fake.delay)
                name, _, arg = action.partition(":")
                if name == "429":
                    return self._send(
                        429, b'{"error": {"message": "rate limited"}}', {"Retry-After": arg or "0"}
                    )
                if name in ("500", "503", "400", "401"):
                    return self._send(int(name), b'{"error": {"message": "injected"}}')
                if name == "garbage":
                    return self._send(200, b"<html>not json")
                if name == "timeout":
                    time.sleep(float(arg))
                content = {
                    "malformed": 'this is not json {"revision"',
                    "norevision": json.dumps({"explanation": "no revision here"}),
                    "toolong": json.dumps({"explanation": "x", "revision": "word " * 5000}),
                    "badscore": "Both answers are fine.",
                }.get(name) or fake.reply(key, user)
                reply = {
                    "id": "cmpl-1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": content},
                        }
                    ],
                    "usage": USAGE,
                }
                self._send(200, json.dumps(reply).encode())

        return Handler


if __name__ == "__main__":
    plan = json.loads(Path(sys.argv[1]).read_text()) if len(sys.argv) > 1 else {}
    with FakeOpenAI(plan) as server:
        print(server.base_url, flush=True)
        server.thread.join()
