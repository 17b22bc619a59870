"""Projectors and dense connectors (METHOD section 2)."""

from __future__ import annotations

import pytest
import torch

from exgra_med.model.config import ExGraMedConfig
from exgra_med.model.connector import (
    build_projector,
    check_pool_stride,
    connector_input_dim,
    num_image_tokens,
    pool_patches,
    select_features,
)
from exgra_med.model.vision import VisionOutput


def test_projector_shapes_and_layers():
    x = torch.randn(2, 5, 12)
    assert isinstance(build_projector("linear", 12, 8), torch.nn.Linear)
    mlp3 = build_projector("mlp3x_gelu", 12, 8)
    assert [type(m).__name__ for m in mlp3] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert mlp3(x).shape == (2, 5, 8)
    assert build_projector("identity", 12, 12)(x) is x
    with pytest.raises(ValueError, match="identity projector"):
        build_projector("identity", 12, 8)


@pytest.mark.parametrize("bad", ["mlp0x_gelu", "mlp2x_relu", "conv"])
def test_config_rejects_unknown_projectors(bad):
    with pytest.raises(ValueError, match="mm_projector_type"):
        ExGraMedConfig(mm_projector_type=bad)


def _hf_output(num_layers: int = 24, tokens: int = 17, dim: int = 4) -> VisionOutput:
    # hidden_states[i] filled with the value i, CLS token (position 0) with -1.
    layers = []
    for i in range(num_layers + 1):
        h = torch.full((1, tokens, dim), float(i))
        h[:, 0] = -1.0
        layers.append(h)
    return VisionOutput(tuple(layers), num_layers, has_cls=True)


def test_select_layer_drops_cls():
    feats = select_features(_hf_output(), -2)
    assert feats.shape == (1, 16, 4) and torch.all(feats == 23.0)


def test_dci_matches_reference_layer_groups():
    feats = select_features(_hf_output(), -2, "dci")
    assert feats.shape == (1, 16, 12) and connector_input_dim("dci", 4) == 12
    # Reference: mean of hidden_states[0..11] and of [12..23] for the 24-layer CLIP ViT-L.
    assert torch.all(feats[..., 4:8] == sum(range(12)) / 12)
    assert torch.all(feats[..., 8:] == sum(range(12, 24)) / 12)


def test_sci_and_sti_use_layers_7_and_15():
    sci = select_features(_hf_output(), -2, "sci")
    assert torch.all(sci[..., 4:8] == 7.0) and torch.all(sci[..., 8:] == 15.0)
    sti = select_features(_hf_output(), -2, "sti")
    assert sti.shape == (1, 16 + 2 * 2, 4) == (1, num_image_tokens("sti", 16), 4)
    assert torch.all(sti[:, 16:18] == 7.0) and torch.all(sti[:, 18:] == 15.0)


def test_dci_on_open_clip_groups_num_l_blocks():
    blocks = tuple(torch.full((1, 9, 2), float(i)) for i in range(12))
    out = VisionOutput(blocks, 12, has_cls=False)
    feats = select_features(out, -2, "dci", num_l=3, open_clip=True)
    assert torch.all(feats[..., :2] == 10.0)
    assert torch.all(feats[..., 2:4] == 1.0) and torch.all(feats[..., 4:] == 4.0)
    with pytest.raises(ValueError, match="lower num_l"):
        select_features(out, -2, "dci", num_l=7, open_clip=True)


def test_pool_patches_averages_grid_blocks_in_row_major_order():
    # A 4 x 4 grid of patches whose single channel holds the patch index 0..15 (row-major), a second channel 1.
    feats = torch.stack([torch.arange(16.0), torch.ones(16)], dim=-1)[None]  # (1, 16, 2)
    pooled = pool_patches(feats, 2)
    assert pooled.shape == (1, 4, 2) == (1, num_image_tokens("none", 16, 2), 2)
    # Blocks {0,1,4,5}, {2,3,6,7}, {8,9,12,13}, {10,11,14,15}.
    assert pooled[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]
    assert pooled[0, :, 1].tolist() == [1.0] * 4
    assert pool_patches(feats, 4)[0, :, 0].tolist() == [7.5]
    assert pool_patches(feats, 1) is feats
    assert num_image_tokens("none", 64, 8) == 1 and num_image_tokens("dci", 64, 2) == 16


@pytest.mark.parametrize(("patches", "stride", "message"), [(16, 3, "4 x 4"), (12, 2, "not square"), (16, 0, "4 x 4")])
def test_pool_stride_must_divide_the_grid(patches, stride, message):
    with pytest.raises(ValueError, match=f"mm_spatial_pool_stride={stride} .*{message}"):
        check_pool_stride(patches, stride)


def test_config_checks_the_pool_stride():
    assert ExGraMedConfig().mm_spatial_pool_stride == 1  # the reference: no pooling
    with pytest.raises(ValueError, match="mm_spatial_pool_stride must be >= 1"):
        ExGraMedConfig(mm_spatial_pool_stride=0)
    with pytest.raises(ValueError, match="sti"):
        ExGraMedConfig(mm_spatial_pool_stride=2, mm_dense_connector_type="sti")


def test_select_feature_cls_and_cls_patch():
    out = _hf_output()
    cls = select_features(out, -2, select_feature="cls")
    assert cls.shape == (1, 1, 4) and torch.all(cls == -1.0)
    both = select_features(out, -1, select_feature="cls_patch")
    assert both.shape == (1, 17, 4) and torch.all(both[:, 0] == -1.0) and torch.all(both[:, 1:] == 24.0)
    assert num_image_tokens("none", 16, select_feature="cls") == 1
    assert num_image_tokens("none", 16, select_feature="cls_patch") == 17
    no_cls = VisionOutput(out.layers, 24, has_cls=False)
    with pytest.raises(ValueError, match="needs a vision tower with a CLS token"):
        select_features(no_cls, -2, select_feature="cls")


def test_config_checks_the_select_feature():
    assert ExGraMedConfig().mm_vision_select_feature == "patch"  # the reference
    with pytest.raises(ValueError, match="mm_vision_select_feature must be one of"):
        ExGraMedConfig(mm_vision_select_feature="pooled")
    with pytest.raises(ValueError, match="combines with neither"):
        ExGraMedConfig(mm_vision_select_feature="cls", mm_dense_connector_type="dci")
    with pytest.raises(ValueError, match="combines with neither"):
        ExGraMedConfig(mm_vision_select_feature="cls_patch", mm_spatial_pool_stride=2)
