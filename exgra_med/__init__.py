"""ExGra-Med: LLaVA-style medical vision-language models with multi-graph alignment.

`import exgra_med` registers the model with transformers' Auto classes (see `exgra_med.model`). The `exgra-med`
console script defers that registration to the commands that need it (`exgra_med.cli`): it costs importing torch and
transformers (about 10 s on a CPU), which commands such as `subsample` or `score` never use.
"""

__version__ = "0.1.0"

import os as _os
import sys as _sys

if _os.path.basename((getattr(_sys, "argv", None) or [""])[0]) != "exgra-med":
    import exgra_med.model  # noqa: E402, F401 - registration with AutoConfig / AutoModelForImageTextToText / AutoProcessor
