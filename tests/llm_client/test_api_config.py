"""Endpoint / key resolution: pairing of keys with endpoints, .env loading, and no key in repr."""

from __future__ import annotations

import pytest

from exgra_med.llm_client.config import (
    OPENAI_DEFAULT_ENDPOINT,
    OPENROUTER_DEFAULT_ENDPOINT,
    load_api_config,
)

ENV_VARS = ("OPENROUTER_API_KEY", "OPENROUTER_ENDPOINT", "OPENAI_API_KEY", "OPENAI_BASE_URL")


def test_openrouter_key_wins_and_pairs_with_its_endpoint() -> None:
    env = {"OPENROUTER_API_KEY": "sk-or", "OPENAI_API_KEY": "sk-oa", "OPENAI_BASE_URL": "http://oa/v1"}
    cfg = load_api_config(environ=env)
    assert (cfg.base_url, cfg.api_key, cfg.key_source) == (
        OPENROUTER_DEFAULT_ENDPOINT,
        "sk-or",
        "OPENROUTER_API_KEY",
    )
    env["OPENROUTER_ENDPOINT"] = "http://router.local/api/v1/"
    assert load_api_config(environ=env).base_url == "http://router.local/api/v1"


def test_openai_key_never_goes_to_openrouter_by_default() -> None:
    cfg = load_api_config(environ={"OPENAI_API_KEY": "sk-oa", "OPENROUTER_ENDPOINT": "http://router/v1"})
    assert (cfg.base_url, cfg.api_key) == (OPENAI_DEFAULT_ENDPOINT, "sk-oa")
    cfg = load_api_config(environ={"OPENAI_API_KEY": "sk-oa", "OPENAI_BASE_URL": "http://vllm:8000/v1"})
    assert cfg.base_url == "http://vllm:8000/v1"


def test_explicit_base_url_and_missing_key() -> None:
    cfg = load_api_config(base_url="http://x/v1", environ={"OPENAI_API_KEY": "k"})
    assert cfg.base_url == "http://x/v1"
    with pytest.raises(RuntimeError, match="OPENROUTER_API_KEY"):
        load_api_config(environ={"OPENAI_BASE_URL": "http://x/v1"})


def test_key_is_not_in_repr_or_description() -> None:
    cfg = load_api_config(environ={"OPENAI_API_KEY": "sk-secret-123"})
    assert "sk-secret-123" not in repr(cfg)
    assert "sk-secret-123" not in cfg.describe()
    assert "OPENAI_API_KEY" in cfg.describe()


def test_env_file_is_loaded_without_overriding(tmp_path, monkeypatch) -> None:
    for var in ENV_VARS:  # setenv then delenv: monkeypatch restores "unset" even for vars .env adds
        monkeypatch.setenv(var, "x")
        monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("OPENROUTER_API_KEY=sk-from-dotenv\nOPENROUTER_ENDPOINT=http://dot/v1\n")
    cfg = load_api_config()  # nearest .env from the working directory
    assert (cfg.base_url, cfg.api_key) == ("http://dot/v1", "sk-from-dotenv")
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-from-env")
    other = tmp_path / "other.env"
    other.write_text("OPENROUTER_API_KEY=sk-ignored\n")
    assert load_api_config(env_file=other).api_key == "sk-from-env"
    with pytest.raises(FileNotFoundError, match="missing.env"):
        load_api_config(env_file=tmp_path / "missing.env")
