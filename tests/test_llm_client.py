"""The chat-completions client against a chat-completions server on loopback (tests.chat_server)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from emailops.llm.client import ChatClient, ChatRequest, LlmError
from tests.chat_server import ChatServer, Drip, Raw, Slow, Status

KEY = "sk-test-0123456789abcdef"
REQUEST = ChatRequest(
    model="tiny-model",
    messages=({"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}),
    max_tokens=50,
    temperature=0.2,
)


@pytest.fixture
def server() -> ChatServer:
    with ChatServer(reply=lambda _r: "Hello back.") as chat:
        yield chat


def test_non_streaming_answer_with_usage_and_the_request_as_sent(server: ChatServer) -> None:
    completion = ChatClient(server.base_url, api_key=KEY, timeout_seconds=5).complete(REQUEST)

    assert completion.text == "Hello back."
    assert completion.tokens_in and completion.tokens_in > 0
    assert completion.tokens_out and completion.tokens_out > 0
    assert completion.finish_reason == "stop"
    [received] = server.requests
    assert received.path == "/v1/chat/completions"
    assert received.headers["Authorization"] == f"Bearer {KEY}"
    assert received.body == {
        "model": "tiny-model",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        "max_tokens": 50,
        "stream": False,
        "temperature": 0.2,
    }


def test_no_key_no_authorization_header(server: ChatServer) -> None:
    ChatClient(server.base_url, timeout_seconds=5).complete(REQUEST)
    assert "Authorization" not in server.requests[0].headers


def test_a_streamed_answer_with_usage_and_the_request_as_sent(server: ChatServer) -> None:
    completion = ChatClient(server.base_url, api_key=KEY, timeout_seconds=5, stream=True).complete(REQUEST)

    assert completion.text == "Hello back."
    assert completion.finish_reason == "stop"
    assert completion.tokens_in and completion.tokens_in > 0
    assert completion.tokens_out and completion.tokens_out > 0
    [received] = server.requests
    assert received.headers["Accept"] == "text/event-stream"
    assert received.body["stream"] is True
    assert received.body["stream_options"] == {"include_usage": True}


def test_a_stream_is_read_even_when_not_asked_for_and_its_deadline_spans_it(server: ChatServer) -> None:
    """Some servers and proxies always stream. Each chunk comes within the timeout, the whole
    answer does not: the timeout bounds the call, not the wait for one chunk."""
    client = ChatClient(server.base_url, timeout_seconds=5)
    server.script.append(Drip(0.05))
    completion = client.complete(REQUEST)
    assert (completion.text, completion.finish_reason) == ("Hello back.", "stop")
    assert (completion.tokens_in, completion.tokens_out) == (None, None)  # no usage was asked for
    # Only CR and LF end a line of the stream: a raw U+2028 in a chunk's text is part of it.
    raw = '{"choices": [{"delta": {"content": "one\u2028two"}, "finish_reason": "stop"}]}'
    server.script.append(Raw(f"data: {raw}\n\ndata: [DONE]\n\n".encode(), content_type="text/event-stream"))
    assert client.complete(REQUEST).text == "one\u2028two"

    server.script.append(Drip(0.6))  # 4 chunks: 2.4 s in all
    started = time.monotonic()
    with pytest.raises(LlmError) as caught:
        ChatClient(server.base_url, timeout_seconds=1).complete(REQUEST)
    assert caught.value.retryable and "no answer within 1 s" in caught.value.reason
    assert time.monotonic() - started < 2


def test_a_stream_cut_short_or_reporting_an_error_is_retryable_and_never_shows_the_key(
    server: ChatServer,
) -> None:
    piece = b'data: {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": null}]}\n\n'
    failure = json.dumps({"error": {"message": f"overloaded, key {KEY}"}}).encode()
    server.script.extend(
        [
            Raw(piece, content_type="text/event-stream"),
            Raw(piece + b"data: " + failure + b"\n\n", content_type="text/event-stream"),
            Raw(piece + b"data: {not json\n\n", content_type="text/event-stream"),
        ]
    )
    client = ChatClient(server.base_url, api_key=KEY, timeout_seconds=5, stream=True)
    reasons = []
    for _ in range(3):
        with pytest.raises(LlmError) as caught:
            client.complete(REQUEST)
        assert caught.value.retryable
        reasons.append(caught.value.reason)
    assert reasons == [
        "the answer's stream ended before its end ([DONE])",
        "the stream reported an error: overloaded, key **********",
        "the answer's stream has a chunk that is not a JSON object",
    ]


def test_429_is_retryable_with_the_servers_retry_after(server: ChatServer) -> None:
    server.script.append(Status(429, retry_after="7"))
    with pytest.raises(LlmError) as caught:
        ChatClient(server.base_url, api_key=KEY, timeout_seconds=5).complete(REQUEST)
    assert caught.value.retryable
    assert caught.value.retry_after == 7.0
    assert caught.value.status == 429


def test_retry_after_as_an_http_date(server: ChatServer) -> None:
    later = datetime.now(UTC) + timedelta(seconds=120)
    server.script.append(Status(429, retry_after=format_datetime(later, usegmt=True)))
    with pytest.raises(LlmError) as caught:
        ChatClient(server.base_url, timeout_seconds=5).complete(REQUEST)
    assert caught.value.retry_after is not None and 100 <= caught.value.retry_after <= 121


def test_5xx_is_retryable_and_4xx_is_not(server: ChatServer) -> None:
    client = ChatClient(server.base_url, api_key=KEY, timeout_seconds=5)
    server.script.extend([Status(500), Status(503), Status(400), Status(401)])
    outcomes = []
    for _ in range(4):
        with pytest.raises(LlmError) as caught:
            client.complete(REQUEST)
        outcomes.append((caught.value.status, caught.value.retryable))
    assert outcomes == [(500, True), (503, True), (400, False), (401, False)]


def test_a_slow_server_is_a_retryable_timeout_bounded_by_the_timeout(server: ChatServer) -> None:
    server.script.append(Slow(5))
    started = time.monotonic()
    with pytest.raises(LlmError) as caught:
        ChatClient(server.base_url, timeout_seconds=0.5).complete(REQUEST)
    assert caught.value.retryable
    assert "no answer within 0.5 s" in caught.value.reason
    assert time.monotonic() - started < 4


def test_nothing_listening_is_a_retryable_connection_failure() -> None:
    with ChatServer() as chat:
        url = chat.base_url
    with pytest.raises(LlmError) as caught:
        ChatClient(url, timeout_seconds=2).complete(REQUEST)
    assert caught.value.retryable and caught.value.reason.startswith("connection failed")


def test_the_key_never_appears_in_an_error_even_when_the_server_echoes_it(server: ChatServer) -> None:
    client = ChatClient(server.base_url, api_key=KEY, timeout_seconds=5)
    client.url = server.base_url + f"/chat/completions?key={KEY}"  # a 404 whose message names the key
    with pytest.raises(LlmError) as caught:
        client.complete(REQUEST)
    assert caught.value.status == 404
    assert KEY not in str(caught.value) and KEY not in caught.value.reason
    assert "**********" in caught.value.reason


def test_not_a_chat_completion_is_retryable(server: ChatServer) -> None:
    server.script.extend([Raw(b"<html>gateway</html>"), Raw(b'{"choices": []}')])
    client = ChatClient(server.base_url, timeout_seconds=5)
    for _ in range(2):
        with pytest.raises(LlmError, match="not a chat completion") as caught:
            client.complete(REQUEST)
        assert caught.value.retryable
    assert client.complete(REQUEST).text == "Hello back."


def test_only_http_urls() -> None:
    with pytest.raises(ValueError, match="http"):
        ChatClient("file:///etc/passwd")
