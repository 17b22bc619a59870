"""Export to transformers' native LLaVA format (served as-is by transformers, vLLM and SGLang).

The weight mapping lives here; `exgra-med export-hf` (exgra_med.model.export_cli) writes the folder.
"""

from __future__ import annotations

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from exgra_med.model.modeling import ExGraMedForConditionalGeneration


def check_exportable(model: ExGraMedForConditionalGeneration) -> None:
    """Raise ValueError unless the connector is one LLaVA expresses: mlp2x_gelu, no dense connector, HF CLIP."""
    cfg = model.config
    problems = []
    if cfg.mm_projector_type != "mlp2x_gelu":
        problems.append(f"mm_projector_type={cfg.mm_projector_type!r} (LLaVA has a 2-layer GELU MLP)")
    if cfg.mm_dense_connector_type != "none":
        problems.append(f"mm_dense_connector_type={cfg.mm_dense_connector_type!r} (LLaVA has no dense connector)")
    if cfg.mm_vision_select_feature == "cls":
        problems.append("mm_vision_select_feature='cls' (LLaVA feeds the patches, with or without CLS)")
    if cfg.mm_spatial_pool_stride != 1:
        problems.append(f"mm_spatial_pool_stride={cfg.mm_spatial_pool_stride} (LLaVA does not pool image tokens)")
    if cfg.vision_tower_type != "hf" or cfg.vision_config.get("model_type") != "clip_vision_model":
        problems.append("the vision tower is not an HF CLIP vision model")
    if problems:
        raise ValueError("cannot express this model in transformers' LLaVA format: " + "; ".join(problems))


def to_hf_llava_config(model: ExGraMedForConditionalGeneration) -> LlavaConfig:
    """The `LlavaConfig` equivalent to `model`'s configuration (image token = `<im_patch>`)."""
    check_exportable(model)
    cfg = model.config
    return LlavaConfig(
        vision_config=dict(cfg.vision_config),
        text_config=cfg.text_config.to_dict(),
        image_token_index=cfg.image_token_id,
        image_seq_length=model.num_image_tokens,
        projector_hidden_act="gelu",
        # "default" drops the CLS token (our `patch`), "full" keeps it (`cls_patch`).
        vision_feature_select_strategy="full" if cfg.mm_vision_select_feature == "cls_patch" else "default",
        vision_feature_layer=cfg.mm_vision_select_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(cfg.text_config.tie_word_embeddings),
    )


def to_hf_llava(model: ExGraMedForConditionalGeneration) -> LlavaForConditionalGeneration:
    """A `LlavaForConditionalGeneration` holding the same weights as `model`."""
    llava = LlavaForConditionalGeneration(to_hf_llava_config(model)).to(next(model.parameters()).dtype)
    target = llava.state_dict()
    source: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith("alignment."):
            continue  # the alignment GNN is a training-time module
        if key.startswith("mm_projector."):
            index, name = key.split(".")[1:]
            new = f"model.multi_modal_projector.linear_{1 if index == '0' else 2}.{name}"
        elif key.startswith("language_model.lm_head."):
            new = key.replace("language_model.lm_head.", "lm_head.")
        elif key.startswith("language_model.model."):
            new = key.replace("language_model.model.", "model.language_model.")
        elif key.startswith("vision_tower.model."):
            new = key.replace("vision_tower.model.", "model.vision_tower.", 1)
        else:
            raise ValueError(f"no LLaVA counterpart for weight {key!r}")
        if new not in target:
            raise ValueError(f"weight {key!r} maps to {new!r}, which LLaVA does not have")
        source[new] = value
    missing = set(target) - set(source)
    if missing:
        raise ValueError(f"LLaVA weights left without a source: {sorted(missing)[:5]}")
    llava.load_state_dict(source, strict=True)
    return llava.eval()

