"""Building models from parts (LLM + vision tower folders) and loading / saving stage-1 projectors.

Loading a whole checkpoint (either layout) is `exgra_med.model.checkpoint.load_model`; `load_pretrained` is that
function under the name training and evaluation import.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from exgra_med.align.config import AlignmentConfig
from exgra_med.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN
from exgra_med.model.checkpoint import is_exgra_med_checkpoint, read_weights, write_safetensors  # noqa: F401
from exgra_med.model.checkpoint import load_model as load_pretrained  # noqa: F401 - the name train/eval import
from exgra_med.model.config import ExGraMedConfig
from exgra_med.model.delimiters import delimiter_state, init_rows_to_mean, load_delimiter_rows
from exgra_med.model.hub import resolve_path
from exgra_med.model.modeling import ExGraMedForConditionalGeneration
from exgra_med.model.reference import projector_state
from exgra_med.model.tokenizer import prepare_tokenizer
from exgra_med.model.vision import load_image_processor, load_vision_tower

logger = logging.getLogger(__name__)

PROJECTOR_FILES = ("mm_projector.safetensors", "mm_projector.bin")


@dataclass
class ConnectorOptions:
    """How the vision tower is connected to the LLM, and which alignment objective stage 2 adds."""

    mm_projector_type: str = "mlp2x_gelu"
    mm_dense_connector_type: str = "none"
    num_l: int = 6
    mm_spatial_pool_stride: int = 1
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    mm_use_im_start_end: bool = True
    freeze_vision_tower: bool = True
    # The alignment objective: an AlignmentConfig, or a dict of its fields / legacy flat keys (contrastive, ...).
    alignment: AlignmentConfig | dict = field(default_factory=AlignmentConfig)


def build_from_parts(
    llm_path: str,
    vision_tower_path: str,
    options: ConnectorOptions | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    quantization_config: object | None = None,
    device: str | torch.device | None = None,
) -> tuple[ExGraMedForConditionalGeneration, PreTrainedTokenizerBase, object]:
    """Assemble a model from a causal-LM folder and a vision-tower folder (fresh projector); either may be a Hub id.

    With `quantization_config` (bitsandbytes, `exgra_med.model.quantization.bnb_config`) the LLM loads quantised onto
    `device`; the vision tower then takes `dtype`, and the projector and alignment head stay in float32.
    Returns (model, tokenizer with image tokens, image processor).
    """
    options = options or ConnectorOptions()
    llm_path = resolve_path(llm_path, "LLM", require=("config.json",))
    tokenizer = AutoTokenizer.from_pretrained(llm_path, use_fast=True)
    quantized = {}
    if quantization_config is not None:
        if device is None:
            raise ValueError("quantised loading needs a device (bitsandbytes places the weights while loading)")
        quantized = {"quantization_config": quantization_config, "device_map": {"": torch.device(device)}}
    llm = AutoModelForCausalLM.from_pretrained(
        llm_path, dtype=dtype, attn_implementation=attn_implementation, **quantized
    )
    tower, vision_config, tower_type = load_vision_tower(vision_tower_path, attn_implementation)
    if dtype is not None:
        tower.to(dtype)
    old_vocab = llm.get_input_embeddings().num_embeddings
    if prepare_tokenizer(tokenizer, options.mm_use_im_start_end):
        llm.resize_token_embeddings(len(tokenizer))
    if llm.config.pad_token_id is None:
        llm.config.pad_token_id = tokenizer.pad_token_id
    config = ExGraMedConfig(
        text_config=llm.config,
        vision_config=vision_config,
        vision_tower_type=tower_type,
        mm_vision_tower=vision_tower_path,
        mm_vision_select_layer=options.mm_vision_select_layer,
        mm_vision_select_feature=options.mm_vision_select_feature,
        mm_projector_type=options.mm_projector_type,
        mm_dense_connector_type=options.mm_dense_connector_type,
        num_l=options.num_l,
        mm_spatial_pool_stride=options.mm_spatial_pool_stride,
        mm_use_im_start_end=options.mm_use_im_start_end,
        image_token_id=tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_PATCH_TOKEN),
        im_start_token_id=tokenizer.convert_tokens_to_ids(DEFAULT_IM_START_TOKEN)
        if options.mm_use_im_start_end
        else None,
        im_end_token_id=tokenizer.convert_tokens_to_ids(DEFAULT_IM_END_TOKEN) if options.mm_use_im_start_end else None,
        freeze_vision_tower=options.freeze_vision_tower,
        alignment_config=AlignmentConfig.coerce(options.alignment),
    )
    config._attn_implementation = attn_implementation
    model = ExGraMedForConditionalGeneration(config, language_model=llm, vision_tower=tower)
    new_delimiters = [i for i in (config.im_start_token_id, config.im_end_token_id) if i is not None and i >= old_vocab]
    init_rows_to_mean(model, new_delimiters)  # the reference's start for newly added <im_start>/<im_end>
    if quantization_config is not None:  # quantised weights must not be cast; the trained parts stay float32
        model.vision_tower.to(device=device, dtype=dtype)
        for part in (model.mm_projector, model.alignment):
            if part is not None:
                part.to(device=device, dtype=torch.float32)
    elif dtype is not None:
        model.to(dtype)  # the fresh projector and alignment GNN too
    return model, tokenizer, load_image_processor(vision_tower_path)


def load_projector(model: ExGraMedForConditionalGeneration, path: str | Path) -> None:
    """Load stage-1 projector weights (a file, or a folder or Hub id holding mm_projector.safetensors/.bin), and the
    trained `<im_start>`/`<im_end>` input embeddings stored with them when the model uses those tokens.

    Accepts this project's keys (`mm_projector.0.weight`) and the reference's (`model.mm_projector.0.weight`).
    """
    path = Path(resolve_path(path, "projector", require=PROJECTOR_FILES))
    if path.is_dir():
        found = [path / n for n in PROJECTOR_FILES if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: none of {PROJECTOR_FILES} found")
        path = found[0]
    weights = read_weights(path)
    cleaned = projector_state(weights, path)
    try:
        model.mm_projector.load_state_dict(cleaned, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: projector weights do not fit this model's connector: {e}") from e
    if load_delimiter_rows(model, weights, path):
        logger.info("loaded projector weights and the <im_start>/<im_end> embeddings from %s", path)
    elif model.config.mm_use_im_start_end:
        logger.warning("%s: projector weights only; <im_start>/<im_end> keep their current embeddings", path)
    else:
        logger.info("loaded projector weights from %s", path)


def save_projector(model: ExGraMedForConditionalGeneration, out_dir: str | Path,
                   embed_rows: torch.Tensor | None = None) -> Path:
    """Write the stage-1 result as `mm_projector.safetensors` (atomically): the projector (`mm_projector.*`) and,
    when the model uses them, the `<im_start>`/`<im_end>` input embeddings (`exgra_med.model.delimiters`).
    `embed_rows` replaces the model's own rows (ZeRO-3 hands over gathered weights)."""
    state = {f"mm_projector.{k}": v for k, v in model.mm_projector.state_dict().items()}
    delimiters = delimiter_state(model)
    if delimiters and embed_rows is not None:
        delimiters = {k: embed_rows for k in delimiters}
    return write_safetensors({**state, **delimiters}, Path(out_dir) / PROJECTOR_FILES[0])
