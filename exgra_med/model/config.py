"""`ExGraMedConfig`: vision tower + connector + causal LM + alignment options in one config."""

from __future__ import annotations

import logging
import re
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from exgra_med.align.config import LEGACY_KEYS, AlignmentConfig

logger = logging.getLogger(__name__)

PROJECTOR_TYPES = ("linear", "identity", "mlpNx_gelu")
DENSE_CONNECTOR_TYPES = ("none", "sti", "sci", "dci")
VISION_TOWER_TYPES = ("hf", "open_clip")
SELECT_FEATURES = ("patch", "cls_patch", "cls")


def check_projector_type(name: str) -> None:
    """Raise ValueError unless `name` is linear, identity or mlp{N}x_gelu (N >= 1)."""
    if name in ("linear", "identity") or re.fullmatch(r"mlp([1-9]\d*)x_gelu", name):
        return
    raise ValueError(f"mm_projector_type must be one of {PROJECTOR_TYPES} (N >= 1), got {name!r}")


class ExGraMedConfig(PreTrainedConfig):
    """Configuration of `ExGraMedForConditionalGeneration`.

    `text_config` is any causal-LM config (LLaMA, Mistral, Qwen2, ...). `vision_config` is a plain dict: the
    `to_dict()` of an HF vision config (CLIP / SigLIP vision model) when `vision_tower_type="hf"`, or an open_clip
    `model_cfg` (with `vision_cfg`) when `vision_tower_type="open_clip"` (BiomedCLIP).
    The `mm_*` names keep the reference implementation's spelling. `alignment_config` holds every alignment option
    (`exgra_med.align.AlignmentConfig`, a nested dict in config.json); config.json files written before it held the
    options as flat keys (`contrastive`, `align_k`, ...), which are migrated into it on load.
    """

    model_type = "exgra_med"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | None = None
    vision_tower_type: str = "hf"
    # Where the vision tower was loaded from (informational; the reference's `mm_vision_tower`).
    mm_vision_tower: str | None = None
    mm_vision_select_layer: int = -2
    # Which tokens of that layer enter the projector: `patch` (the reference: CLS dropped), `cls_patch`, `cls`.
    mm_vision_select_feature: str = "patch"
    mm_projector_type: str = "mlp2x_gelu"
    mm_dense_connector_type: str = "none"
    # Average pooling of the patch grid before the projector, s x s patches per image token (1: none, the
    # reference; LLaVA-NeXT's name). Fewer image tokens make a shorter LLM context.
    mm_spatial_pool_stride: int = 1
    # Group size of the DCI connector on BiomedCLIP (number of blocks averaged per group).
    num_l: int = 6
    mm_use_im_start_end: bool = True
    image_token_id: int | None = None
    im_start_token_id: int | None = None
    im_end_token_id: int | None = None
    freeze_vision_tower: bool = True
    # ExGra-Med alignment (METHOD section 4): an AlignmentConfig (a dict or None are converted on construction).
    alignment_config: AlignmentConfig | dict | None = None
    # Set while the LLM carries LoRA adapters (a `--lora_enable` run's checkpoints), so that `merge-lora` knows the
    # scaling; None in plain (merged) checkpoints.
    lora_alpha: float | None = None
    # The prompt template the model was trained with (`exgra-med train --conv_template`); evaluation and serving use
    # it unless told otherwise. None in checkpoints written before it was recorded and in converted released ones.
    conv_template: str | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        # Flat alignment keys: config.json files written before `alignment_config` existed, or old-style kwargs.
        legacy = {key: kwargs.pop(key) for key in list(kwargs) if key in LEGACY_KEYS}
        alignment = AlignmentConfig.coerce(self.alignment_config)
        if legacy:
            logger.info("migrating flat alignment keys %s into alignment_config", sorted(legacy))
            alignment = alignment.replace(**legacy)
        self.alignment_config = alignment
        super().__post_init__(**kwargs)
        if self.vision_config is None:
            self.vision_config = {"model_type": "clip_vision_model"}
        if isinstance(self.vision_config, PreTrainedConfig):
            self.vision_config = self.vision_config.to_dict()
        check_projector_type(self.mm_projector_type)
        if self.mm_dense_connector_type not in DENSE_CONNECTOR_TYPES:
            raise ValueError(
                f"mm_dense_connector_type must be one of {DENSE_CONNECTOR_TYPES}, got {self.mm_dense_connector_type!r}"
            )
        if self.mm_vision_select_feature not in SELECT_FEATURES:
            raise ValueError(
                f"mm_vision_select_feature must be one of {SELECT_FEATURES}, got {self.mm_vision_select_feature!r}"
            )
        if self.mm_vision_select_feature != "patch" and (
            self.mm_dense_connector_type != "none" or self.mm_spatial_pool_stride != 1
        ):
            raise ValueError(
                f"mm_vision_select_feature={self.mm_vision_select_feature!r} combines with neither a dense connector "
                "nor spatial pooling (both work on the patch grid)"
            )
        if self.mm_spatial_pool_stride < 1:
            raise ValueError(f"mm_spatial_pool_stride must be >= 1, got {self.mm_spatial_pool_stride}")
        if self.mm_spatial_pool_stride > 1 and self.mm_dense_connector_type == "sti":
            raise ValueError("mm_spatial_pool_stride > 1 does not combine with the sti dense connector")
        if self.vision_tower_type not in VISION_TOWER_TYPES:
            raise ValueError(f"vision_tower_type must be one of {VISION_TOWER_TYPES}, got {self.vision_tower_type!r}")
        if self.num_l < 1:
            raise ValueError(f"num_l must be >= 1, got {self.num_l}")

    @property
    def hidden_size(self) -> int:
        """The language model's hidden size (what DeepSpeed's `auto` bucket sizes read)."""
        return self.text_config.hidden_size

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """Also takes alignment overrides (`load_pretrained(path, **overrides)` lands here): `alignment_config=` an
        AlignmentConfig, which replaces the saved one, or a dict of changes to it; and flat keys (`contrastive=True`,
        `align_k=3`, ...), changed one by one."""
        replacement = kwargs.pop("alignment_config", None)
        changes = {key: kwargs.pop(key) for key in list(kwargs) if key in LEGACY_KEYS}
        result = super().from_dict(config_dict, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        if isinstance(replacement, AlignmentConfig):
            config.alignment_config = replacement
        elif replacement is not None:
            changes = {**dict(replacement), **changes}
        if changes:
            config.alignment_config = config.alignment_config.replace(**changes)
        return result

    def to_dict(self) -> dict[str, Any]:
        """Serialisable dict; `alignment_config` as a nested dict (always written in full)."""
        output = super().to_dict()
        if isinstance(output.get("alignment_config"), AlignmentConfig):
            output["alignment_config"] = output["alignment_config"].to_dict()
        return output
