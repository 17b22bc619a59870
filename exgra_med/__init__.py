"""ExGra-Med: LLaVA-style medical vision-language models with multi-graph alignment."""

__version__ = "0.1.0"
