"""ExGra-Med: LLaVA-style medical vision-language models with multi-graph alignment.

`import exgra_med` registers the model with transformers' Auto classes (see `exgra_med.model`).
"""

__version__ = "0.1.0"

import exgra_med.model  # noqa: E402, F401 - registration with AutoConfig / AutoModelForImageTextToText / AutoProcessor
