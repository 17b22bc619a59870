"""Where an OpenAI-compatible endpoint and its key come from: flags, the environment, or a `.env` file.

Keys are paired with their endpoints so that a key is never sent to another provider's endpoint:
`OPENROUTER_API_KEY` goes with `OPENROUTER_ENDPOINT` (default: OpenRouter) and `OPENAI_API_KEY` with
`OPENAI_BASE_URL` (default: OpenAI). The key is only read when a client is made, so the package imports
without one, and it never appears in `repr()` or in log lines.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

OPENROUTER_DEFAULT_ENDPOINT = "https://openrouter.ai/api/v1"
OPENAI_DEFAULT_ENDPOINT = "https://api.openai.com/v1"


@dataclass(frozen=True)
class ApiConfig:
    """An OpenAI-compatible endpoint and the key to use with it."""

    base_url: str
    """Root of the API, e.g. `https://openrouter.ai/api/v1`."""
    api_key: str = field(repr=False)
    """Secret key; excluded from repr so that it cannot leak through logs."""
    key_source: str = ""
    """Name of the environment variable the key came from (safe to log)."""

    def describe(self) -> str:
        """A log-safe one-line description: endpoint and the variable holding the key, never the key."""
        return f"endpoint {self.base_url} (key from ${self.key_source})"


def load_env_file(env_file: str | os.PathLike | None = None) -> Path | None:
    """Load a `.env` file into the environment without overriding variables that are already set.

    With `env_file=None` the nearest `.env` upwards from the working directory is used, if any.
    Returns the file that was loaded, or None.
    """
    # lazy: python-dotenv is optional (the api extra)
    from dotenv import find_dotenv, load_dotenv

    if env_file is not None:
        path = Path(env_file)
        if not path.is_file():
            raise FileNotFoundError(f"--env-file {path} does not exist")
    else:
        found = find_dotenv(usecwd=True)
        if not found:
            return None
        path = Path(found)
    load_dotenv(path, override=False)
    logger.debug("loaded environment from %s", path)
    return path


def load_api_config(
    base_url: str | None = None,
    env_file: str | os.PathLike | None = None,
    environ: dict[str, str] | None = None,
) -> ApiConfig:
    """Resolve the endpoint and key: `base_url` flag, then the environment (after loading `.env`).

    `OPENROUTER_API_KEY` (+ `OPENROUTER_ENDPOINT`) wins over `OPENAI_API_KEY` (+ `OPENAI_BASE_URL`).
    An explicit `base_url` overrides the endpoint of whichever key is used.
    """
    if environ is None:
        load_env_file(env_file)
        environ = dict(os.environ)
    pairs = [
        ("OPENROUTER_API_KEY", "OPENROUTER_ENDPOINT", OPENROUTER_DEFAULT_ENDPOINT),
        ("OPENAI_API_KEY", "OPENAI_BASE_URL", OPENAI_DEFAULT_ENDPOINT),
    ]
    for key_var, url_var, default_url in pairs:
        key = environ.get(key_var, "").strip()
        if key:
            url = base_url or environ.get(url_var, "").strip() or default_url
            return ApiConfig(base_url=url.rstrip("/"), api_key=key, key_source=key_var)
    raise RuntimeError(
        "no API key found: set OPENROUTER_API_KEY (with OPENROUTER_ENDPOINT) or OPENAI_API_KEY "
        "(with OPENAI_BASE_URL) in the environment or in a .env file"
    )


def make_client(config: ApiConfig, timeout: float) -> Any:
    """An `openai.OpenAI` client for `config` with its own retries disabled (ours are in `retry.py`)."""
    try:
        # lazy: openai is optional (the api extra)
        import openai
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the API tools need the `openai` package: pip install 'exgra-med[api]'") from e
    return openai.OpenAI(base_url=config.base_url, api_key=config.api_key, timeout=timeout, max_retries=0)
