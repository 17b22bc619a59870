"""Connectors from vision features to the LLM: projectors and dense connectors (METHOD section 2)."""

from __future__ import annotations

import math
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


def num_image_tokens(dense_type: str, num_patches: int, pool_stride: int = 1, select_feature: str = "patch") -> int:
    """Tokens per image after the connector (`sti` appends two 8x avg-pooled copies on the token axis; a pooling
    stride s > 1 averages each s x s block of the patch grid into one token; `cls_patch` adds the CLS token to the
    patches, `cls` keeps the CLS token alone)."""
    if select_feature == "cls":
        return 1
    if select_feature == "cls_patch":
        return num_patches + 1
    if dense_type == "sti":
        return num_patches + 2 * (num_patches // 8)
    return num_patches // pool_stride**2


def check_pool_stride(num_patches: int, pool_stride: int) -> None:
    """Raise ValueError unless `pool_stride` divides the side of the square patch grid."""
    side = math.isqrt(num_patches)
    if pool_stride < 1 or side * side != num_patches or side % pool_stride:
        raise ValueError(
            f"mm_spatial_pool_stride={pool_stride} must divide the side of the tower's patch grid "
            f"({num_patches} patches{f', {side} x {side}' if side * side == num_patches else ', not square'})"
        )


def pool_patches(feats: torch.Tensor, pool_stride: int) -> torch.Tensor:
    """Average each `pool_stride` x `pool_stride` block of the square patch grid: (B, N, C) -> (B, N / s^2, C), in
    row-major order (LLaVA-NeXT's `mm_spatial_pool_stride` with average pooling). Stride 1 returns `feats`."""
    if pool_stride == 1:
        return feats
    b, n, c = feats.shape
    check_pool_stride(n, pool_stride)
    side = math.isqrt(n)
    grid = feats.transpose(1, 2).reshape(b, c, side, side)
    return F.avg_pool2d(grid, pool_stride).flatten(2).transpose(1, 2)


def _two_layers(num_layers: int) -> tuple[int, int]:
    # The reference picks hidden_states[7] and [15] of the 24-layer CLIP ViT-L: one and two thirds of the depth.
    return max(num_layers // 3 - 1, 0), max(2 * num_layers // 3 - 1, 0)


def _patches(x: torch.Tensor, has_cls: bool) -> torch.Tensor:
    return x[:, 1:] if has_cls else x


def select_features(
    out: VisionOutput,
    select_layer: int,
    dense_type: str = "none",
    num_l: int = 6,
    open_clip: bool = False,
    select_feature: str = "patch",
) -> torch.Tensor:
    """The features entering the projector, (B, N', C') from a tower's per-layer hidden states.

    `select_feature` (LLaVA's `mm_vision_select_feature`): `patch` drops the CLS token (the reference), `cls_patch`
    keeps it in front of the patches, `cls` keeps it alone (one token per image); the last two need a tower with a
    CLS token and no dense connector.
    """
    if select_feature != "patch":
        if not out.has_cls:
            raise ValueError(f"mm_vision_select_feature={select_feature!r} needs a vision tower with a CLS token")
        layer = out.layers[select_layer]
        return layer[:, :1] if select_feature == "cls" else layer
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
