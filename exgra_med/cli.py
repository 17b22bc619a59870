"""`exgra-med <command> [args]`: a thin dispatcher; each command is a typed `main(argv)` elsewhere.

Commands are imported lazily so that `exgra-med --help` stays fast and optional dependencies are
only needed by the commands that use them; the commands in `LIGHT_COMMANDS` also run without registering the model
with transformers' Auto classes (`exgra_med/__init__.py` leaves that to this dispatcher in the console script).
A user mistake (`exgra_med.errors.is_user_error`) ends with one line on stderr and exit code 2; other exceptions are
bugs and keep their traceback. `exgra-med --debug <command>` (or `EXGRA_MED_DEBUG=1`) shows the traceback of every
error.
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from collections.abc import Callable, Sequence

from exgra_med import __version__
from exgra_med.errors import USER_ERROR_EXIT_CODE, debug_requested, is_user_error, one_line

# command -> ("module:function", one-line help). Add a line here when a command lands.
COMMANDS: dict[str, tuple[str, str]] = {
    "make-tiny-model": ("exgra_med.model.tiny:main", "write a tiny random model + tokenizer (offline)"),
    "prepare": ("exgra_med.data.prepare:main", "turn a raw data set into training / VQA records"),
    "subsample": ("exgra_med.data.prepare.subsample:main", "seeded fraction / few-shot subset of a record file"),
    "score": ("exgra_med.eval.metrics:main", "VQA metrics of an answers file (reference definitions)"),
    "generate-vqa": ("exgra_med.eval.generate:main", "batched, resumable VQA answer generation (one chunk)"),
    "generate-vqa-multi": ("exgra_med.eval.launch:main", "VQA answers: chunks over the visible GPUs, then merged"),
    "zero-shot": ("exgra_med.eval.zero_shot:main", "OmniMedVQA zero-shot multiple-choice accuracy"),
    "grounding-audit": ("exgra_med.eval.grounding:main", "VQA scores with real, blank and shuffled images"),
    "vqa-baselines": (
        "exgra_med.eval.baselines:main",
        "model vs majority / question-prior baselines on a VQA test set",
    ),
    "data-efficiency": (
        "exgra_med.eval.study:main",
        "data-efficiency study: one cell's result file (record) / table + figure (summarize)",
    ),
    "plot": ("exgra_med.eval.plots:main", "loss curves of a run / data-efficiency figure"),
    "train": ("exgra_med.train.main:main", "stage-1 / stage-2 pre-training and VQA fine-tuning"),
    "extend-captions": ("exgra_med.data.extend:main", "LLM-written extended captions (resumable, fault tolerant)"),
    "merge-extended": ("exgra_med.data.prepare.merge_extended:main", "merge extended captions as conversations_long"),
    "chatbot-review": ("exgra_med.eval.chatbot:main", "LLM-judged medical visual chatbot review"),
    "convert": ("exgra_med.model.reference:main", "convert a released (reference-layout) checkpoint to this format"),
    "export-hf": ("exgra_med.model.export_cli:main", "export to transformers' LLaVA format (vLLM, SGLang)"),
    "merge-lora": ("exgra_med.model.lora:main", "merge a LoRA run's checkpoint into a plain checkpoint"),
    "chat": ("exgra_med.serve.chat:main", "terminal chat with an image (streamed answers)"),
    "web": ("exgra_med.serve.web:main", "Gradio web demo"),
    "serve-api": ("exgra_med.serve.api:main", "OpenAI-compatible /v1/chat/completions server"),
}

# Commands that load no model: run without importing torch and transformers for the registration (about 10 s).
LIGHT_COMMANDS = frozenset({"prepare", "subsample", "score", "vqa-baselines", "data-efficiency", "plot",
                            "extend-captions", "merge-extended", "chatbot-review"})


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: exgra-med [--debug] <command> [args]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in sorted(COMMANDS.items())]
    lines += ["", "Run `exgra-med <command> --help` for the options of one command.",
              "--debug (or EXGRA_MED_DEBUG=1) shows the Python traceback of every error."]
    return "\n".join(lines)


def quiet_optional_backends() -> None:
    """Silence import-time chatter of optional back ends before any command imports them: bitsandbytes (the
    `quant` extra) warns on CPUs with AVX512-BF16 that it could not fetch an optional kernel from the Hub (its
    own CPU kernels run instead), on every import of transformers or peft, before a command's own output; with
    `kernels` installed (transformers >= 5.25 requires it), that library warns offline that it skips the Hub
    publisher check of the same optional kernel. torch_geometric (2.8) scripts a helper with `torch.jit.script` when
    imported, which torch 2.14 answers with a FutureWarning on stderr (seen with transformers 5.25 installed)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("kernels").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to the command named by the first argument; returns the process exit code."""
    quiet_optional_backends()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested()
    while argv and argv[0] == "--debug":
        debug, argv = True, argv[1:]
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if argv[0] in {"-V", "--version"}:
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"exgra-med: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if name not in LIGHT_COMMANDS:
        # lazy: the Auto-class registration (torch, transformers: ~10 s) only for commands that load models
        import exgra_med.model  # noqa: F401 - the Auto-class registration that the console script defers
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return run_command(func, rest, f"exgra-med {name}", debug)


def run_command(func: Callable[[list[str]], int | None], argv: list[str], prog: str, debug: bool = False) -> int:
    """Call a command's `main(argv)`; a user mistake becomes one `prog: message` line on stderr and exit code 2,
    Ctrl-C exit code 130; anything else propagates with its traceback (as does every error with `debug`)."""
    try:
        return int(func(argv) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug or not is_user_error(e):
            raise
        logging.getLogger(__name__).debug("user error", exc_info=True)
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
