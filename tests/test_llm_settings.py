"""LLM_* settings: the defaults .env.example and the README give, what the worker gets, bad values
named (exit 78 comes from ConfigError, see test_llm_daemon for the process)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prod.runtime_settings import ConfigError, RuntimeSettings

REPO = Path(__file__).resolve().parents[1]
BASE = {
    "EMAIL_IMAP_HOST": "127.0.0.1",
    "EMAIL_IMAP_PORT": "143",
    "EMAIL_SMTP_HOST": "127.0.0.1",
    "EMAIL_SMTP_PORT": "25",
    "EMAIL_USERNAME": "alice@example.test",
    "EMAIL_PASSWORD": "pw",
    "INDEX_DB_URL": "sqlite:////tmp/unused.db",
}


def settings(monkeypatch: pytest.MonkeyPatch, **values: str) -> RuntimeSettings:
    monkeypatch.chdir(REPO / "tests")  # no .env here
    for key in list(os.environ):
        if key.startswith(("EMAIL_", "INDEX_DB_URL", "LLM_")):
            monkeypatch.delenv(key)
    for key, value in (BASE | values).items():
        monkeypatch.setenv(key, value)
    return RuntimeSettings.from_env()


def env_example_defaults() -> dict[str, str]:
    lines = (REPO / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.startswith("LLM_"))


def test_no_base_url_no_model_and_the_documented_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings(monkeypatch).llm_config() is None
    loaded = settings(monkeypatch, LLM_BASE_URL="http://127.0.0.1:11434/v1")
    llm = loaded.llm_config()
    assert llm is not None
    listed = {
        "LLM_BASE_URL": "",
        "LLM_API_KEY": "",
        "LLM_MODEL": llm.model,
        "LLM_TIMEOUT_SECONDS": f"{llm.timeout_seconds:g}",
        "LLM_MAX_INPUT_CHARS": str(llm.max_input_chars),
        "LLM_MAX_REQUESTS_PER_HOUR": str(llm.max_requests_per_hour),
        "LLM_STREAM": str(llm.stream).lower(),
    }
    assert env_example_defaults() == listed
    assert (llm.timeout_seconds, llm.max_input_chars, llm.max_requests_per_hour) == (60.0, 8000, 60)
    assert llm.claim_timeout_seconds >= 2 * llm.timeout_seconds  # a live call's claim is never taken


def test_values_reach_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    llm = settings(
        monkeypatch,
        LLM_BASE_URL="https://api.example.test/v1",
        LLM_API_KEY="sk-settings-123",
        LLM_MODEL="small",
        LLM_TIMEOUT_SECONDS="20",
        LLM_MAX_INPUT_CHARS="500",
        LLM_MAX_REQUESTS_PER_HOUR="7",
        LLM_STREAM="true",
    ).llm_config()
    assert llm is not None
    assert (llm.base_url, llm.api_key, llm.model) == (
        "https://api.example.test/v1",
        "sk-settings-123",
        "small",
    )
    assert (llm.timeout_seconds, llm.max_input_chars, llm.max_requests_per_hour, llm.stream) == (
        20,
        500,
        7,
        True,
    )
    assert "sk-settings-123" not in repr(llm)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LLM_BASE_URL", "ftp://models.example.test/v1"),
        ("LLM_TIMEOUT_SECONDS", "601"),
        ("LLM_TIMEOUT_SECONDS", "0"),
        ("LLM_MAX_INPUT_CHARS", "10"),
        ("LLM_MAX_REQUESTS_PER_HOUR", "0"),
        ("LLM_STREAM", "sometimes"),
    ],
)
def test_a_bad_value_is_named(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        settings(monkeypatch, **({"LLM_BASE_URL": "http://127.0.0.1:8080/v1"} | {name: value}))
