"""Is a folder (or Hub id) a transformers-native VLM? Read from its config.json's `model_type`, without loading it."""

from __future__ import annotations

from pathlib import Path

from exgra_med.io import read_json


def native_model_type(path: str | Path) -> str | None:
    """The `model_type` of a folder that `AutoModelForImageTextToText` loads (qwen2_5_vl, gemma3, llava_onevision,
    llava, ...), None for anything else: this project's checkpoints, released reference-layout LLaVA-Med folders
    (whose model_type is also "llava"), plain LLM folders, or a folder without config.json."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from exgra_med.model.reference import is_reference_config

    file = Path(path) / "config.json"
    if not file.is_file():
        return None
    try:
        config = read_json(file)
    except ValueError:
        return None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or is_reference_config(config):
        return None
    return model_type


def resolve_native(name: str | Path) -> str | None:
    """The local folder of `name` (a folder or a Hub id already in the cache / downloadable) when it is a native VLM,
    else None; resolution failures are left to the caller's own loading path to report."""
    from exgra_med.model.hub import resolve_path

    try:
        folder = resolve_path(str(name), "model", require=("config.json",))
    except (OSError, ValueError):
        return None
    return folder if native_model_type(folder) is not None else None
