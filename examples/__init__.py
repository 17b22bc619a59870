"""Examples built on the `exgra_med` library, apart from it: run from the repository root (`python -m examples...`)."""
