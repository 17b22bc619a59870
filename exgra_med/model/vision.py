"""Vision towers: HF CLIP / SigLIP vision models and BiomedCLIP (a timm ViT) through open_clip.

Every tower returns the per-layer hidden states the connector selects from, so the dense connectors
work the same way on all of them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    CLIPImageProcessor,
    CLIPVisionModel,
    SiglipVisionModel,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from exgra_med.model.checkpoint import read_weights
from exgra_med.model.hub import resolve_vision_tower

logger = logging.getLogger(__name__)

OPEN_CLIP_PREFIX = "local-dir:"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass
class VisionOutput:
    """Per-layer hidden states of a tower.

    `layers[i]` is (B, T, C). For HF towers `layers` is `hidden_states` (index 0 = embeddings, then one entry per
    encoder layer); for open_clip towers it holds one entry per transformer block. `has_cls` tells whether token 0
    of each entry is a CLS token that the connector drops.
    """

    layers: tuple[torch.Tensor, ...]
    num_layers: int
    has_cls: bool


def is_open_clip_path(path: str) -> bool:
    """True when `path` names an open_clip folder (`local-dir:DIR`, or a folder with open_clip_config.json)."""
    if path.startswith(OPEN_CLIP_PREFIX):
        return True
    return (Path(path) / OPEN_CLIP_CONFIG).is_file()


def _strip_prefix(path: str) -> Path:
    return Path(path[len(OPEN_CLIP_PREFIX):] if path.startswith(OPEN_CLIP_PREFIX) else path)


def _build_open_clip_trunk(model_cfg: dict) -> nn.Module:
    """The timm trunk of an open_clip vision tower, built from `model_cfg` alone (no text tower, no network)."""
    # lazy: open_clip (about 1 s) only for open_clip towers
    from open_clip.model import _build_vision_tower

    vision_cfg = dict(model_cfg["vision_cfg"])
    vision_cfg["timm_model_pretrained"] = False
    visual = _build_vision_tower(model_cfg["embed_dim"], vision_cfg)
    if not hasattr(visual, "trunk"):
        raise ValueError("only timm-based open_clip vision towers (e.g. BiomedCLIP) are supported")
    return visual.trunk


class VisionTower(nn.Module):
    """A vision encoder returning all hidden states; frozen by default."""

    def __init__(self, vision_config: dict, tower_type: str, attn_implementation: str | None = None):
        super().__init__()
        self.tower_type = tower_type
        if tower_type == "hf":
            cfg = AutoConfig.for_model(**vision_config)
            if attn_implementation is not None:
                cfg._attn_implementation = attn_implementation
            self.model = AutoModel.from_config(cfg)
            self.has_cls = cfg.model_type != "siglip_vision_model"
            self.num_layers = cfg.num_hidden_layers
            self.hidden_size = cfg.hidden_size
            self.image_size = cfg.image_size
            self.patch_size = cfg.patch_size
        else:
            self.model = _build_open_clip_trunk(vision_config)
            self.has_cls = False  # timm's get_intermediate_layers drops prefix tokens
            self.num_layers = len(self.model.blocks)
            self.hidden_size = self.model.embed_dim
            image_size = vision_config["vision_cfg"]["image_size"]
            self.image_size = image_size if isinstance(image_size, int) else image_size[0]
            patch = self.model.patch_embed.patch_size
            self.patch_size = patch if isinstance(patch, int) else patch[0]

    @property
    def num_patches(self) -> int:
        """Number of patch tokens per image (CLS excluded)."""
        return (self.image_size // self.patch_size) ** 2

    def forward(self, pixel_values: torch.Tensor) -> VisionOutput:
        """Encode (B, 3, H, W) images into per-layer hidden states."""
        if self.tower_type == "hf":
            out = self.model(pixel_values=pixel_values, output_hidden_states=True)
            return VisionOutput(tuple(out.hidden_states), self.num_layers, self.has_cls)
        blocks = self.model.get_intermediate_layers(pixel_values, n=self.num_layers)
        return VisionOutput(tuple(blocks), self.num_layers, False)


def load_vision_tower(path: str, attn_implementation: str | None = None) -> tuple[VisionTower, dict, str]:
    """Load a tower from a local folder: an HF CLIP/SigLIP vision (or full CLIP) model, or an open_clip folder.

    `path` may also be a Hub id, or `hf-hub:owner/name` for an open_clip tower (`exgra_med.model.hub`).
    Returns (tower, vision_config dict, tower_type).
    """
    path = resolve_vision_tower(path)
    if is_open_clip_path(path):
        folder = _strip_prefix(path)
        cfg = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
        model_cfg = cfg["model_cfg"]
        tower = VisionTower(model_cfg, "open_clip")
        state = _load_open_clip_visual_state(folder)
        missing, unexpected = tower.model.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"{folder}: open_clip weights miss vision-trunk keys, e.g. {missing[:3]}")
        return tower, model_cfg, "open_clip"
    cfg = AutoConfig.from_pretrained(path)
    vision_cfg = getattr(cfg, "vision_config", cfg)  # a full CLIP/SigLIP folder holds a vision_config
    if vision_cfg.model_type not in ("clip_vision_model", "siglip_vision_model"):
        raise ValueError(f"{path}: expected a CLIP or SigLIP vision model, found model_type={vision_cfg.model_type!r}")

    model_cls = CLIPVisionModel if vision_cfg.model_type == "clip_vision_model" else SiglipVisionModel
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    hf_model = model_cls.from_pretrained(path, **kwargs)
    tower = VisionTower(hf_model.config.to_dict(), "hf", attn_implementation)
    tower.model = hf_model
    return tower, hf_model.config.to_dict(), "hf"


def _load_open_clip_visual_state(folder: Path) -> dict[str, torch.Tensor]:
    """The `visual.trunk.*` weights of an open_clip folder, keyed as the trunk's own state dict."""
    prefix = "visual.trunk."
    for name in OPEN_CLIP_WEIGHTS:
        file = folder / name
        if file.is_file():
            state = read_weights(file, keep=lambda key: key.startswith(prefix))
            if not state:
                raise ValueError(f"{file}: no '{prefix}*' weights found")
            return {k[len(prefix):]: v for k, v in state.items()}
    raise FileNotFoundError(f"{folder}: none of {OPEN_CLIP_WEIGHTS} found")


def load_image_processor(path: str) -> CLIPImageProcessor:
    """The image processor for a tower folder or Hub id (HF preprocessor config, or open_clip's preprocess_cfg)."""
    path = resolve_vision_tower(path)
    if is_open_clip_path(path):
        folder = _strip_prefix(path)
        cfg = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
        pre = cfg.get("preprocess_cfg", {})
        size = cfg["model_cfg"]["vision_cfg"]["image_size"]
        size = size if isinstance(size, int) else size[0]
        return CLIPImageProcessor(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_mean=pre.get("mean", list(OPENAI_CLIP_MEAN)),
            image_std=pre.get("std", list(OPENAI_CLIP_STD)),
        )

    return AutoImageProcessor.from_pretrained(path)
