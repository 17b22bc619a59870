"""ExGra-Med: LLaVA-style medical vision-language models with multi-graph alignment.

`import exgra_med` registers the model with transformers' Auto classes (see `exgra_med.model`). The command line
(the `exgra-med` console script, or `python -m exgra_med.cli` as scripts/ run it) defers that registration to the
commands that need it (`exgra_med.cli`): it costs importing torch and transformers (about 5-10 s on a CPU), which
commands such as `subsample`, `score` or `extend-captions` never use.
"""

__version__ = "0.1.0"

import os as _os
import sys as _sys


def _started_by_the_command_line() -> bool:
    """The console script, or `python -m exgra_med.cli` (while `-m` imports this package, `sys.argv[0]` is "-m": the
    module is read from the interpreter's own command line)."""
    if _os.path.basename((getattr(_sys, "argv", None) or [""])[0]) == "exgra-med":
        return True
    command = list(getattr(_sys, "orig_argv", []))
    return any(a == "-m" and b == "exgra_med.cli" for a, b in zip(command, command[1:]))


if not _started_by_the_command_line():
    import exgra_med.model  # noqa: E402, F401 - registration with AutoConfig / AutoModelForImageTextToText / AutoProcessor
