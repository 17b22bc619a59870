"""Clients of remote OpenAI-compatible LLM APIs: endpoint config, retries, and a resumable job runner.

Used by extended-caption generation (`exgra_med.data.extend`) and the chatbot review
(`exgra_med.eval.chatbot`), whose command-line frame is `job_cli.run_job_command`. The server side,
an OpenAI-compatible endpoint for our own model, is `exgra_med.serve.api`. Importing this package
needs neither `openai` nor an API key.
"""

from exgra_med.llm_client.config import ApiConfig, load_api_config, make_client
from exgra_med.llm_client.progress import ProgressLog, failures_path_for, load_progress, progress_path_for
from exgra_med.llm_client.retry import FatalApiError, InvalidReply, RetryPolicy
from exgra_med.llm_client.runner import ItemContext, ItemFailed, RunResult, RunStats, run_jobs

__all__ = [
    "ApiConfig",
    "FatalApiError",
    "InvalidReply",
    "ItemContext",
    "ItemFailed",
    "ProgressLog",
    "RetryPolicy",
    "RunResult",
    "RunStats",
    "failures_path_for",
    "load_api_config",
    "load_progress",
    "make_client",
    "progress_path_for",
    "run_jobs",
]
