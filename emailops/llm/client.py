"""A client for OpenAI-compatible chat-completions endpoints (hosted APIs, Ollama, llama.cpp, vLLM).

Standard library only (``urllib``): one POST per call, nothing that a new dependency would add for
it. The answer is a chat completion, or with ``stream`` server-sent events (``data:`` chunks whose
``delta.content`` pieces make the text, ending with ``data: [DONE]``); an event stream is read
whichever was asked, as some servers and proxies always stream. The client:
- bounds the whole call (connection to last byte) by ``timeout_seconds``: each socket operation
  waits at most the time left, and the body (a stream too) is read in pieces against the deadline;
- bounds the answer's size (``MAX_RESPONSE_BYTES``);
- follows no redirect (the key would go with it) and uses no proxy from the environment;
- classifies failures: ``LlmError.retryable`` for timeouts, connection failures, 408, 429 (with the
  server's Retry-After) and 5xx; not for other answers (a wrong key, an unknown model);
- never puts the key in an error message.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from http.client import HTTPException, HTTPResponse
from typing import Any

from emailops.config import LlmConfig

MAX_RESPONSE_BYTES = 2 * 1024 * 1024
MAX_REASON_CHARS = 300
_CHUNK = 64 * 1024
_SSE_LINE_END = re.compile(r"\r\n|\r|\n")


class LlmError(Exception):
    """The call failed; ``retryable`` says whether trying later may succeed."""

    def __init__(self, reason: str, *, retryable: bool, retry_after: float | None = None, status: int = 0):
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[dict[str, str], ...]
    max_tokens: int
    temperature: float | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    tokens_in: int | None
    tokens_out: int | None
    finish_reason: str | None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx answer becomes an HTTPError


class ChatClient:
    def __init__(
        self, base_url: str, *, api_key: str = "", timeout_seconds: float = 30.0, stream: bool = False
    ) -> None:
        if not base_url.lower().startswith(("http://", "https://")):
            raise ValueError("the model's base URL must start with http:// or https://")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key
        self.timeout_seconds = timeout_seconds
        self.stream = stream
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())

    @classmethod
    def for_config(cls, config: LlmConfig) -> ChatClient:
        return cls(
            config.base_url,
            api_key=config.api_key,
            timeout_seconds=config.timeout_seconds,
            stream=config.stream,
        )

    def complete(self, request: ChatRequest) -> Completion:
        payload: dict[str, Any] = {
            "model": request.model,
            "messages": list(request.messages),
            "max_tokens": request.max_tokens,
            "stream": self.stream,
        }
        if self.stream:
            # Without it a stream carries no token counts (OpenAI, vLLM, Ollama send a last chunk).
            payload["stream_options"] = {"include_usage": True}
        if request.temperature is not None:
            payload["temperature"] = request.temperature
        accept = "text/event-stream" if self.stream else "application/json"
        headers = {"Content-Type": "application/json", "Accept": accept}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        # The scheme is http or https (checked in __init__), never file: or another.
        http_request = urllib.request.Request(  # noqa: S310
            self.url, data=json.dumps(payload).encode("utf-8"), headers=headers, method="POST"
        )
        deadline = time.monotonic() + self.timeout_seconds
        try:
            with self._opener.open(http_request, timeout=self.timeout_seconds) as response:
                body = _read_bounded(response, deadline)
                streamed = response.headers.get_content_type() == "text/event-stream"
        except urllib.error.HTTPError as exc:
            raise self._http_error(exc, deadline) from None
        except TimeoutError:
            raise LlmError(f"no answer within {self.timeout_seconds:g} s", retryable=True) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise LlmError(f"no answer within {self.timeout_seconds:g} s", retryable=True) from None
            raise LlmError(self._clean(f"connection failed: {exc.reason}"), retryable=True) from None
        except (OSError, HTTPException) as exc:
            raise LlmError(
                self._clean(f"connection failed: {type(exc).__name__}: {exc}"), retryable=True
            ) from None
        return _parse_stream(body, self._clean) if streamed else _parse_completion(body)

    def _http_error(self, exc: urllib.error.HTTPError, deadline: float) -> LlmError:
        status = exc.code
        try:
            detail = _read_bounded(exc, deadline, limit=4096).decode("utf-8", "replace")  # type: ignore[arg-type]
        except (OSError, HTTPException, LlmError):
            detail = ""
        finally:
            exc.close()
        message = _error_message(detail)
        reason = self._clean(f"HTTP {status}" + (f": {message}" if message else ""))
        retryable = status in (408, 409, 429) or status >= 500
        retry_after = _retry_after(exc.headers.get("Retry-After")) if exc.headers else None
        return LlmError(reason, retryable=retryable, retry_after=retry_after, status=status)

    def _clean(self, text: str) -> str:
        """One line, bounded, and never the key (a server may echo what it was sent)."""
        if self._api_key:
            text = text.replace(self._api_key, "**********")
        return " ".join(text.split())[:MAX_REASON_CHARS]


def _read_bounded(response: HTTPResponse, deadline: float, limit: int = MAX_RESPONSE_BYTES) -> bytes:
    chunks: list[bytes] = []
    size = 0
    sock = _socket_of(response)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        if sock is not None:
            sock.settimeout(left)
        chunk = response.read1(_CHUNK) if hasattr(response, "read1") else response.read(_CHUNK)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise LlmError(f"the answer is larger than {limit} bytes", retryable=False)
        chunks.append(chunk)


def _socket_of(response: Any) -> socket.socket | None:
    """The connection's socket, so each read waits only for the time left (http.client keeps it
    as ``fp.raw._sock``; None if a future version does not: the per-read timeout still applies)."""
    raw = getattr(getattr(response, "fp", None), "raw", None)
    sock = getattr(raw, "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


def _parse_completion(body: bytes) -> Completion:
    try:
        data = json.loads(body)
        choice = data["choices"][0]
        text = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise LlmError(
            "the answer is not a chat completion (no choices[0].message.content)", retryable=True
        ) from None
    if not isinstance(text, str):
        raise LlmError("the answer's content is not text", retryable=True)
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return Completion(
        text=text,
        tokens_in=_int_or_none(usage.get("prompt_tokens")),
        tokens_out=_int_or_none(usage.get("completion_tokens")),
        finish_reason=choice.get("finish_reason") if isinstance(choice.get("finish_reason"), str) else None,
    )


def _parse_stream(body: bytes, clean: Callable[[str], str]) -> Completion:
    """A completion from server-sent events. Lines other than ``data:`` (comments, ``event:``) are
    skipped; a chunk's ``usage`` (the last one, with ``include_usage``) gives the token counts. A
    stream that ends without ``[DONE]`` or a finish reason was cut short: retryable, like an
    ``error`` event (its message passes through ``clean``, as a server may echo the key)."""
    pieces: list[str] = []
    usage: dict[str, Any] = {}
    finish_reason: str | None = None
    ended = False
    # Lines end at CR, LF or CRLF only (str.splitlines would also cut at U+2028 inside a chunk).
    for line in _SSE_LINE_END.split(body.decode("utf-8", "replace")):
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            ended = True
            break
        chunk = _stream_chunk(data)
        if chunk.get("error") is not None:
            message = _error_message(json.dumps({"error": chunk["error"]}))
            raise LlmError(clean(f"the stream reported an error: {message}"), retryable=True)
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            continue
        delta = choices[0].get("delta")
        content = delta.get("content") if isinstance(delta, dict) else None
        if isinstance(content, str):
            pieces.append(content)
        if isinstance(choices[0].get("finish_reason"), str):
            finish_reason = choices[0]["finish_reason"]
    if not ended and finish_reason is None:
        raise LlmError("the answer's stream ended before its end ([DONE])", retryable=True)
    return Completion(
        text="".join(pieces),
        tokens_in=_int_or_none(usage.get("prompt_tokens")),
        tokens_out=_int_or_none(usage.get("completion_tokens")),
        finish_reason=finish_reason,
    )


def _stream_chunk(data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError:
        chunk = None
    if not isinstance(chunk, dict):
        raise LlmError("the answer's stream has a chunk that is not a JSON object", retryable=True)
    return chunk


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _error_message(detail: str) -> str:
    """The ``error.message`` of an OpenAI-style error body, else the body's start."""
    try:
        data = json.loads(detail)
        message = data["error"]["message"] if isinstance(data.get("error"), dict) else data.get("error")
        if isinstance(message, str):
            return message
    except (ValueError, AttributeError, KeyError, TypeError):
        pass
    return detail


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds: a number of seconds, or an HTTP date (RFC 9110 section 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())
