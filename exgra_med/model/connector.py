"""Connectors from vision features to the LLM: projectors and dense connectors (METHOD section 2)."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from exgra_med.model.vision import VisionOutput


def build_projector(projector_type: str, in_dim: int, out_dim: int) -> nn.Module:
    """`linear`, `identity`, or `mlp{N}x_gelu` (Linear, then N-1 times GELU + Linear)."""
    if projector_type == "linear":
        return nn.Linear(in_dim, out_dim)
    if projector_type == "identity":
        if in_dim != out_dim:
            raise ValueError(f"identity projector needs equal sizes, got vision {in_dim} and LLM {out_dim}")
        return nn.Identity()
    match = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if match is None:
        raise ValueError(f"unknown mm_projector_type {projector_type!r}")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


def connector_input_dim(dense_type: str, vision_hidden: int) -> int:
    """Channel size entering the projector: 3 x hidden for the channel-concatenating `sci` and `dci`."""
    return vision_hidden * 3 if dense_type in ("sci", "dci") else vision_hidden


def num_image_tokens(dense_type: str, num_patches: int) -> int:
    """Tokens per image after the connector (`sti` appends two 8x avg-pooled copies on the token axis)."""
    return num_patches + 2 * (num_patches // 8) if dense_type == "sti" else num_patches


def _two_layers(num_layers: int) -> tuple[int, int]:
    # The reference picks hidden_states[7] and [15] of the 24-layer CLIP ViT-L: one and two thirds of the depth.
    return max(num_layers // 3 - 1, 0), max(2 * num_layers // 3 - 1, 0)


def _patches(x: torch.Tensor, has_cls: bool) -> torch.Tensor:
    return x[:, 1:] if has_cls else x


def select_features(
    out: VisionOutput, select_layer: int, dense_type: str = "none", num_l: int = 6, open_clip: bool = False
) -> torch.Tensor:
    """The features entering the projector, (B, N', C') from a tower's per-layer hidden states."""
    feats = _patches(out.layers[select_layer], out.has_cls)  # (B, N, C)
    if dense_type == "none":
        return feats
    if dense_type in ("sti", "sci"):
        i, j = _two_layers(out.num_layers)
        a, b = (_patches(out.layers[k], out.has_cls).to(feats.dtype) for k in (i, j))
        if dense_type == "sci":
            return torch.cat([feats, a, b], dim=-1)  # (B, N, 3C)
        pooled = [F.avg_pool1d(x.transpose(1, 2), kernel_size=8, stride=8).transpose(1, 2) for x in (a, b)]
        return torch.cat([feats, *pooled], dim=1)  # (B, N + 2 N/8, C)
    if dense_type == "dci":
        group = num_l if open_clip else out.num_layers // 2
        if 2 * group > len(out.layers):
            raise ValueError(f"dci needs {2 * group} layers, the tower has {len(out.layers)}; lower num_l")
        first = torch.stack([_patches(x, out.has_cls) for x in out.layers[:group]]).mean(0)
        second = torch.stack([_patches(x, out.has_cls) for x in out.layers[group : 2 * group]]).mean(0)
        return torch.cat([feats, first.to(feats.dtype), second.to(feats.dtype)], dim=-1)  # (B, N, 3C)
    raise ValueError(f"unknown mm_dense_connector_type {dense_type!r}")
