"""`ExGraMedConfig`: vision tower + connector + causal LM + alignment options in one config."""

from __future__ import annotations

import re

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

PROJECTOR_TYPES = ("linear", "identity", "mlpNx_gelu")
DENSE_CONNECTOR_TYPES = ("none", "sti", "sci", "dci")
VISION_TOWER_TYPES = ("hf", "open_clip")
CONTRASTIVE_LOSS_TYPES = ("infonce", "siglip")
SIMILARITY_TYPES = ("average", "OT")


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
    The `mm_*` names and the alignment flags keep the reference implementation's spelling.
    """

    model_type = "exgra_med"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | None = None
    vision_tower_type: str = "hf"
    # Where the vision tower was loaded from (informational; the reference's `mm_vision_tower`).
    mm_vision_tower: str | None = None
    mm_vision_select_layer: int = -2
    mm_projector_type: str = "mlp2x_gelu"
    mm_dense_connector_type: str = "none"
    # Group size of the DCI connector on BiomedCLIP (number of blocks averaged per group).
    num_l: int = 6
    mm_use_im_start_end: bool = True
    image_token_id: int | None = None
    im_start_token_id: int | None = None
    im_end_token_id: int | None = None
    freeze_vision_tower: bool = True
    # ExGra-Med alignment (METHOD section 4); all off means plain LLaVA-Med training.
    contrastive: bool = False
    multi_graph: bool = False
    after_de: bool = False
    alpha: float = 1.0
    contrastive_loss_type: str = "infonce"
    simi_type: str = "average"
    align_k: int = 5
    align_lambda: float = 80.0
    align_noise_scale: float = 0.05
    align_seed: int = 0
    align_masked_mean: bool = False
    align_global_batch: bool = False
    align_scale_invariant: bool = False
    # Set while the LLM carries LoRA adapters (a `--lora_enable` run's checkpoints), so that `merge-lora` knows the
    # scaling; None in plain (merged) checkpoints.
    lora_alpha: float | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
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
        if self.vision_tower_type not in VISION_TOWER_TYPES:
            raise ValueError(f"vision_tower_type must be one of {VISION_TOWER_TYPES}, got {self.vision_tower_type!r}")
        if self.contrastive_loss_type not in CONTRASTIVE_LOSS_TYPES:
            raise ValueError(
                f"contrastive_loss_type must be one of {CONTRASTIVE_LOSS_TYPES}, got {self.contrastive_loss_type!r}"
            )
        if self.simi_type not in SIMILARITY_TYPES:
            raise ValueError(f"simi_type must be one of {SIMILARITY_TYPES}, got {self.simi_type!r}")
        if self.num_l < 1:
            raise ValueError(f"num_l must be >= 1, got {self.num_l}")

    @property
    def hidden_size(self) -> int:
        """The language model's hidden size (what DeepSpeed's `auto` bucket sizes read)."""
        return self.text_config.hidden_size

    @property
    def alignment_enabled(self) -> bool:
        """True when stage-2 training adds an alignment loss to the LM loss."""
        return bool(self.contrastive)
