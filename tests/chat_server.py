"""A chat-completions server on loopback for the tests: the OpenAI protocol, non-streaming and
streaming (``"stream": true``: server-sent events, a first chunk with the role, the text a word a
chunk, the finish reason, with ``stream_options.include_usage`` a last chunk with the usage and no
choices, then ``data: [DONE]``).

It answers every request with ``reply(request)`` unless a scripted answer is queued
(``script.append(...)``): ``Slow(seconds)`` waits before answering, ``Drip(seconds)`` streams the
answer (asked for or not) waiting that long before each chunk, ``Status(429, retry_after=2)``
or ``Status(500)`` answers an error, ``Raw(body)`` answers 200 with a body as it is (not a
completion, or a broken event stream with ``content_type="text/event-stream"``).
``requests`` keeps every request (headers and JSON body); ``started`` is set when a request arrives
(a test can kill a worker during the call).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

JSON = "application/json"


@dataclass(frozen=True)
class Slow:
    seconds: float


@dataclass(frozen=True)
class Drip:
    seconds_per_chunk: float


@dataclass(frozen=True)
class Status:
    code: int
    retry_after: str | None = None


@dataclass(frozen=True)
class Raw:
    """A 200 answer with this body as it is (not a chat completion)."""

    body: bytes
    content_type: str = JSON


@dataclass
class Received:
    headers: dict[str, str]
    body: dict[str, Any]
    path: str

    @property
    def prompt(self) -> str:
        return str(self.body["messages"][-1]["content"])


def echo_reply(request: Received) -> str:
    return "Thank you for your message. We will look into it."


@dataclass
class ChatServer:
    reply: Callable[[Received], str] = echo_reply
    script: deque[Slow | Drip | Status | Raw] = field(default_factory=deque)
    requests: list[Received] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)
    # Every successful answer waits until this is set (set at start; a test clears it to hold calls).
    release: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.release.set()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                received = Received(dict(self.headers.items()), body, self.path)
                with server._lock:
                    server.requests.append(received)
                    step = server.script.popleft() if server.script else None
                server.started.set()
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._json(404, {"error": {"message": f"no route {self.path}"}})
                    return
                if isinstance(step, Status):
                    headers = {"Retry-After": step.retry_after} if step.retry_after else {}
                    self._json(step.code, {"error": {"message": f"scripted {step.code}"}}, headers)
                    return
                if isinstance(step, Raw):
                    self._send(200, step.body, {}, step.content_type)
                    return
                if isinstance(step, Slow):
                    deadline = time.monotonic() + step.seconds
                    while time.monotonic() < deadline:
                        time.sleep(0.05)
                server.release.wait(60)
                text = server.reply(received)
                if isinstance(step, Drip):
                    self._stream(text, body, pause=step.seconds_per_chunk)
                elif body.get("stream"):
                    self._stream(text, body)
                else:
                    self._json(200, _completion(text, body))

            def _json(self, code: int, data: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                self._send(code, json.dumps(data).encode(), headers or {})

            def _send(
                self, code: int, payload: bytes, headers: dict[str, str], content_type: str = JSON
            ) -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(payload)))
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            def _stream(self, text: str, body: dict[str, Any], pause: float = 0.0) -> None:
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Cache-Control", "no-cache")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    words = text.split(" ")
                    deltas = [{"role": "assistant"}]
                    deltas += [{"content": w if i == 0 else " " + w} for i, w in enumerate(words)]
                    for delta in deltas:
                        time.sleep(pause)
                        self._event({"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}, body)
                    self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, body)
                    if (body.get("stream_options") or {}).get("include_usage"):
                        self._event({"choices": [], "usage": _completion(text, body)["usage"]}, body)
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                    self.close_connection = True
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _event(self, chunk: dict[str, Any], body: dict[str, Any]) -> None:
                head = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "model": body.get("model")}
                self.wfile.write(f"data: {json.dumps(head | chunk)}\n\n".encode())
                self.wfile.flush()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="chat-server", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> ChatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()


def _completion(text: str, body: dict[str, Any]) -> dict[str, Any]:
    prompt_chars = sum(len(str(m.get("content", ""))) for m in body.get("messages", []))
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", ""),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": max(1, prompt_chars // 4),
            "completion_tokens": max(1, len(text) // 4),
            "total_tokens": max(1, prompt_chars // 4) + max(1, len(text) // 4),
        },
    }
