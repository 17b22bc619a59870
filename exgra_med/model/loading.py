"""Building and loading models: from parts (LLM + vision tower folders), from ExGra-Med checkpoints, projectors."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from exgra_med.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN
from exgra_med.model.config import ExGraMedConfig
from exgra_med.model.modeling import ExGraMedForConditionalGeneration
from exgra_med.model.vision import load_image_processor, load_vision_tower

logger = logging.getLogger(__name__)

PROJECTOR_FILES = ("mm_projector.safetensors", "mm_projector.bin")


@dataclass
class ConnectorOptions:
    """How the vision tower is connected to the LLM, and which alignment objective stage 2 adds."""

    mm_projector_type: str = "mlp2x_gelu"
    mm_dense_connector_type: str = "none"
    num_l: int = 6
    mm_vision_select_layer: int = -2
    mm_use_im_start_end: bool = True
    freeze_vision_tower: bool = True
    alignment: dict = field(default_factory=dict)  # ExGraMedConfig alignment fields (contrastive, multi_graph, ...)


def is_exgra_med_checkpoint(path: str | Path) -> bool:
    """True when `path` holds a config.json of this project's model type."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == ExGraMedConfig.model_type
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg}: invalid JSON: {e}") from e


def add_special_tokens(tokenizer: PreTrainedTokenizerBase, mm_use_im_start_end: bool) -> int:
    """Add the pad token (if missing) and the image tokens, as the reference does; returns how many were added."""
    added = 0
    if tokenizer.pad_token is None:
        added += tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    tokens = [DEFAULT_IMAGE_PATCH_TOKEN]
    if mm_use_im_start_end:
        tokens += [DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN]
    added += tokenizer.add_tokens(tokens, special_tokens=True)
    return added


def build_from_parts(
    llm_path: str,
    vision_tower_path: str,
    options: ConnectorOptions | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
) -> tuple[ExGraMedForConditionalGeneration, PreTrainedTokenizerBase, object]:
    """Assemble a model from a local causal-LM folder and a local vision-tower folder (fresh projector).

    Returns (model, tokenizer with image tokens, image processor).
    """
    options = options or ConnectorOptions()
    tokenizer = AutoTokenizer.from_pretrained(llm_path, use_fast=True)
    llm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=dtype, attn_implementation=attn_implementation)
    tower, vision_config, tower_type = load_vision_tower(vision_tower_path, attn_implementation)
    if dtype is not None:
        tower.to(dtype)
    if add_special_tokens(tokenizer, options.mm_use_im_start_end):
        llm.resize_token_embeddings(len(tokenizer))
    if llm.config.pad_token_id is None:
        llm.config.pad_token_id = tokenizer.pad_token_id
    config = ExGraMedConfig(
        text_config=llm.config,
        vision_config=vision_config,
        vision_tower_type=tower_type,
        mm_vision_tower=vision_tower_path,
        mm_vision_select_layer=options.mm_vision_select_layer,
        mm_projector_type=options.mm_projector_type,
        mm_dense_connector_type=options.mm_dense_connector_type,
        num_l=options.num_l,
        mm_use_im_start_end=options.mm_use_im_start_end,
        image_token_id=tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_PATCH_TOKEN),
        im_start_token_id=tokenizer.convert_tokens_to_ids(DEFAULT_IM_START_TOKEN) if options.mm_use_im_start_end else None,
        im_end_token_id=tokenizer.convert_tokens_to_ids(DEFAULT_IM_END_TOKEN) if options.mm_use_im_start_end else None,
        freeze_vision_tower=options.freeze_vision_tower,
        **options.alignment,
    )
    config._attn_implementation = attn_implementation
    model = ExGraMedForConditionalGeneration(config, language_model=llm, vision_tower=tower)
    if dtype is not None:
        model.to(dtype)  # the fresh projector and alignment GNN too
    return model, tokenizer, load_image_processor(vision_tower_path)


def load_pretrained(
    path: str,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    device: str | torch.device | None = None,
    **config_overrides,
) -> tuple[ExGraMedForConditionalGeneration, PreTrainedTokenizerBase, object]:
    """Load an ExGra-Med checkpoint folder: (model, tokenizer, image processor), model in eval mode."""
    if not is_exgra_med_checkpoint(path):
        raise ValueError(f"{path}: not an ExGra-Med checkpoint (config.json with model_type 'exgra_med' expected)")
    model = ExGraMedForConditionalGeneration.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, **config_overrides
    )
    # dtype again: from_pretrained builds the vision tower from its own sub-config, whose saved dtype would win.
    model.to(device=device, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
    processor = load_image_processor(path)
    return model.eval(), tokenizer, processor


def load_projector(model: ExGraMedForConditionalGeneration, path: str | Path) -> None:
    """Load stage-1 projector weights (a file, or a folder holding mm_projector.safetensors/.bin).

    Accepts this project's keys (`mm_projector.0.weight`) and the reference's (`model.mm_projector.0.weight`).
    """
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in PROJECTOR_FILES if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: none of {PROJECTOR_FILES} found")
        path = found[0]
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    marker = "mm_projector."
    cleaned = {k[k.index(marker) + len(marker):]: v for k, v in state.items() if marker in k}
    if not cleaned:
        raise ValueError(f"{path}: no 'mm_projector.*' weights found (keys: {list(state)[:5]})")
    try:
        model.mm_projector.load_state_dict(cleaned, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: projector weights do not fit this model's connector: {e}") from e
    logger.info("loaded projector weights from %s", path)


def save_projector(model: ExGraMedForConditionalGeneration, out_dir: str | Path) -> Path:
    """Write only the projector (stage 1) as `mm_projector.safetensors`, keys `mm_projector.*`."""
    from safetensors.torch import save_file

    out = Path(out_dir) / PROJECTOR_FILES[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {f"mm_projector.{k}": v.detach().cpu().contiguous() for k, v in model.mm_projector.state_dict().items()}
    tmp = out.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out)
    return out
