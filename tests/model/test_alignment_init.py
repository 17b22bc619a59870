"""The alignment head is initialised on every load path: from parts, from a checkpoint without its weights, from one
with them (loaded, not re-initialised), in bf16. ZeRO-3 and training from a checkpoint:
tests/train/test_stage2_from_checkpoint.py."""

from __future__ import annotations

import math

import pytest
import torch

from exgra_med.align import ContrastiveAlignmentLoss, MultiGraphAlignmentLoss
from exgra_med.model.loading import ConnectorOptions, build_from_parts, load_pretrained

MULTI_GRAPH = dict(contrastive=True, multi_graph=True, after_de=True)


def assert_like_fresh_gnn(alignment: torch.nn.Module) -> None:
    """Every GNN parameter finite and distributed as torch_geometric's init of a fresh module: U(-b, b), with
    b = 1/sqrt(fan_in), so max |w| <= b and std ~ b/sqrt(3) (bias likewise)."""
    assert isinstance(alignment, MultiGraphAlignmentLoss)
    fresh = dict(MultiGraphAlignmentLoss(alignment.dim).named_parameters())
    params = dict(alignment.named_parameters())
    assert params.keys() == fresh.keys() and params
    bound = 1 / math.sqrt(alignment.dim)
    for name, p in params.items():
        p = p.detach().float()
        assert torch.isfinite(p).all(), name
        assert p.abs().max() <= bound * 1.01, (name, float(p.abs().max()), bound)
        # A U(-b, b) sample of >= 128 values: std within 25% of b/sqrt(3) (garbage memory is far outside this).
        assert float(p.std()) == pytest.approx(bound / math.sqrt(3), rel=0.25), name
        assert p.shape == fresh[name].shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_parts_alignment_like_fresh(tiny_model_dir, dtype):
    model, _, _ = build_from_parts(
        str(tiny_model_dir / "llm"),
        str(tiny_model_dir / "vision"),
        ConnectorOptions(alignment=MULTI_GRAPH),
        dtype=dtype,
    )
    assert_like_fresh_gnn(model.alignment)
    assert {p.dtype for p in model.alignment.parameters()} == {dtype}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_without_alignment_weights_initialises_the_head(tiny_model_dir, dtype):
    # make_tiny_model saves no alignment head: transformers creates it while loading, with its weights missing.
    model, _, _ = load_pretrained(str(tiny_model_dir), dtype=dtype, **MULTI_GRAPH)
    assert_like_fresh_gnn(model.alignment)
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_checkpoint_without_contrastive_weights_initialises_the_temperature(tiny_model_dir):
    model, _, _ = load_pretrained(
        str(tiny_model_dir), contrastive=True, multi_graph=False, contrastive_loss_type="siglip"
    )
    assert isinstance(model.alignment, ContrastiveAlignmentLoss)
    assert model.alignment.logit_scale.item() == pytest.approx(math.log(10.0))
    assert model.alignment.bias.item() == -10.0


def test_checkpoint_with_alignment_weights_loads_them(tiny_model_dir, tmp_path):
    model, tokenizer, processor = load_pretrained(str(tiny_model_dir), **MULTI_GRAPH)
    with torch.no_grad():  # values no initialisation would produce
        for i, p in enumerate(model.alignment.parameters()):
            p.copy_(torch.linspace(-3, 3, p.numel()).view_as(p) + i)
    saved = {n: p.detach().clone() for n, p in model.alignment.named_parameters()}
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    for dtype in (torch.float32, torch.bfloat16):
        loaded, _, _ = load_pretrained(str(tmp_path), dtype=dtype)  # the config saved contrastive=True
        got = dict(loaded.alignment.named_parameters())
        for name, value in saved.items():
            torch.testing.assert_close(got[name], value.to(dtype), rtol=0, atol=0)


def test_typed_alignment_override_replaces_the_saved_options(tiny_model_dir):
    from exgra_med.align import AlignmentConfig

    options = AlignmentConfig(contrastive=True, multi_graph=True, k=3, noise_scale=0.1, dropout=0.2, seed=5)
    model, _, _ = load_pretrained(str(tiny_model_dir), alignment_config=options)
    assert model.config.alignment_config == options
    assert isinstance(model.alignment, MultiGraphAlignmentLoss)
    assert (model.alignment.k, model.alignment.noise_scale, model.alignment.seed) == (3, 0.1, 5)
    assert model.alignment.gnn.dropout == 0.2
