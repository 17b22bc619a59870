"""Command-line options shared by the API tools (endpoint, concurrency, retries), in one place."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Any

from exgra_med.llm_client.config import load_api_config, make_client
from exgra_med.llm_client.retry import RetryPolicy


def add_api_arguments(parser: argparse.ArgumentParser, default_concurrency: int = 8) -> None:
    """Add the endpoint / retry / concurrency flags to `parser`."""
    g = parser.add_argument_group("API")
    g.add_argument(
        "--base-url", default=None, help="endpoint root; default from OPENROUTER_ENDPOINT / OPENAI_BASE_URL"
    )
    g.add_argument("--env-file", default=None, help="a .env file to load (default: nearest .env, if any)")
    g.add_argument("--concurrency", type=int, default=default_concurrency, help="requests in flight")
    g.add_argument(
        "--max-attempts",
        type=int,
        default=None,
        help="attempts per request (env EXGRA_MED_API_MAX_ATTEMPTS, default 6)",
    )
    g.add_argument(
        "--base-delay",
        type=float,
        default=None,
        help="first backoff in seconds, doubled per retry (env EXGRA_MED_API_BASE_DELAY, default 1)",
    )
    g.add_argument(
        "--max-delay",
        type=float,
        default=None,
        help="backoff cap in seconds (env EXGRA_MED_API_MAX_DELAY, default 60)",
    )
    g.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        help="seconds per request (env EXGRA_MED_API_TIMEOUT, default 120)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the backoff jitter")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level")


@dataclass
class ApiRuntime:
    """What a tool needs to run requests: a client, the retry policy and the runner options."""

    client: Any
    policy: RetryPolicy
    concurrency: int
    show_progress: bool


def runtime_from_args(args: argparse.Namespace) -> ApiRuntime:
    """Configure logging and build the client and policy from parsed flags (reads the key here)."""
    logging.basicConfig(
        level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "httpx2", "httpcore", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # request lines add nothing to our own log
    if args.concurrency < 1:
        raise SystemExit(f"--concurrency must be >= 1, got {args.concurrency}")
    policy = RetryPolicy.from_env(
        max_attempts=args.max_attempts, base_delay=args.base_delay, max_delay=args.max_delay, seed=args.seed
    )
    timeout = args.request_timeout
    if timeout is None:
        timeout = float(os.environ.get("EXGRA_MED_API_TIMEOUT") or 120.0)
    config = load_api_config(base_url=args.base_url, env_file=args.env_file)
    logging.getLogger(__name__).info("using %s", config.describe())
    return ApiRuntime(
        client=make_client(config, timeout=timeout),
        policy=policy,
        concurrency=args.concurrency,
        show_progress=not args.no_progress,
    )
