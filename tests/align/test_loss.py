"""MultiGraphAlignmentLoss: re-derived step by step, determinism, small batches, pooling."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from exgra_med.align import (
    AlignmentOutput,
    MultiGraphAlignmentLoss,
    knn_graph,
    pool_tokens,
    solve_partial_qap,
)

DIM = 16


def _inputs(bsz: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(bsz, DIM, generator=gen)
    return [(base + torch.randn(bsz, DIM, generator=gen)).to(dtype).requires_grad_(True) for _ in range(3)]


def _gumbel(shape, gen):
    e = torch.empty(shape).exponential_(generator=gen)
    return -0.05 * torch.log(e)


def _knn(x: torch.Tensor, k: int) -> torch.Tensor:
    src, dst = [], []
    for i in range(x.shape[0]):
        dists = sorted((float((x[i] - x[j]).norm()), j) for j in range(x.shape[0]) if j != i)
        for _, j in dists[:k]:
            src.append(i)
            dst.append(j)
    return torch.tensor([src, dst])


def _graph_conv(conv, x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    # GraphConv with max aggregation written out: W_rel max_{j -> i} x_j + b + W_root x_i (0 if no in-edge).
    agg = torch.zeros_like(x)
    for i in range(x.shape[0]):
        sources = edges[0][edges[1] == i]
        if len(sources):
            agg[i] = x[sources].max(0).values
    return agg @ conv.lin_rel.weight.T + conv.lin_rel.bias + x @ conv.lin_root.weight.T


def _reference_loss(module: MultiGraphAlignmentLoss, nodes: list[torch.Tensor], training: bool) -> dict:
    gen = torch.Generator().manual_seed(module.seed)
    bsz = nodes[0].shape[0]
    bary = sum(nodes) / 3
    node_noise = _gumbel((bsz, bsz), gen)
    pairs = [p for m in nodes for p in ((m, bary), (bary, m))]
    k = min(5, bsz - 1)
    edges = [_knn(g1.detach(), k) for g1, _ in pairs]
    union = torch.cat([g for pair in pairs for g in pair])
    union_edges = torch.cat([edges[i // 2] + i * bsz for i in range(12)], 1)
    h = _graph_conv(module.gnn.conv1, union, union_edges).relu()
    h = _graph_conv(module.gnn.conv2, h, union_edges).relu()
    if training:
        h = h * (torch.rand(h.shape, generator=gen) >= 0.1).float() / 0.9
    num_e = edges[0].shape[1]
    edge_noise = _gumbel((6, num_e, num_e), gen)
    losses = []
    for p in range(6):
        nodes1 = F.normalize(h[2 * p * bsz:(2 * p + 1) * bsz], dim=1)
        nodes2 = F.normalize(h[(2 * p + 1) * bsz:(2 * p + 2) * bsz], dim=1)
        e = edges[p]
        feat1 = F.normalize(h[2 * p * bsz + e[0]] - h[2 * p * bsz + e[1]], dim=1)
        feat2 = F.normalize(h[(2 * p + 1) * bsz + e[0]] - h[(2 * p + 1) * bsz + e[1]], dim=1)
        unary = -(nodes1 @ nodes2.T + node_noise - 0.5)
        quadratic = -0.5 * (feat1 @ feat2.T + edge_noise[p] - 0.5)
        x = solve_partial_qap(unary[None].detach(), quadratic[None].detach(), e[None], e[None])[0]
        losses.append(float((x - torch.eye(bsz)).abs().sum() / bsz))
    parts = {m: (losses[2 * i] + losses[2 * i + 1]) / 2 for i, m in enumerate(("image", "response", "extended"))}
    return {"loss": sum(parts.values()) / 3, **parts}


@pytest.mark.parametrize("training", [False, True])
def test_loss_equals_step_by_step_computation(training):
    torch.manual_seed(0)
    module = MultiGraphAlignmentLoss(DIM, seed=11).train(training)
    nodes = _inputs(9)
    out = module(*nodes)
    assert isinstance(out, AlignmentOutput)
    expected = _reference_loss(module, [n.detach() for n in nodes], training)
    assert float(out.loss.detach()) == pytest.approx(expected["loss"], abs=1e-6)
    for name in ("image", "response", "extended"):
        assert float(out.parts[name].detach()) == pytest.approx(expected[name], abs=1e-6)


def test_knn_graph_semantics():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert knn_graph(x, 2).tolist() == [[0, 0, 1, 1, 2, 2, 3, 3], [1, 2, 0, 2, 1, 0, 2, 1]]
    assert knn_graph(x, 5).shape == (2, 12)  # B <= k: k = B - 1
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(10, 4, generator=gen)
    assert torch.equal(knn_graph(y, 5), _knn(y, 5))


def test_same_seed_same_loss_and_gradients_bit_for_bit():
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        module = MultiGraphAlignmentLoss(DIM, seed=3).train()
        nodes = _inputs(8)
        out = module(*nodes)
        out.loss.backward()
        results.append((out.loss.detach(), [n.grad for n in nodes], [p.grad for p in module.parameters()]))
    (loss_a, in_a, par_a), (loss_b, in_b, par_b) = results
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(in_a + par_a, in_b + par_b))
    assert any(float(g.abs().sum()) > 0 for g in in_a)


def test_batch_of_one_returns_connected_zero_and_warns_once(caplog):
    module = MultiGraphAlignmentLoss(DIM)
    nodes = _inputs(1)
    with caplog.at_level(logging.WARNING, logger="exgra_med.align.loss"):
        out = module(*nodes)
        module(*_inputs(1, seed=1))
    assert float(out.loss.detach()) == 0.0 and out.loss.requires_grad
    assert set(out.parts) == {"image", "response", "extended"}
    assert all(float(v.detach()) == 0.0 and v.requires_grad for v in out.parts.values())
    out.loss.backward()
    # Every parameter and input takes part in the graph (DDP / ZeRO see them used), with zero gradients.
    assert all(p.grad is not None and float(p.grad.abs().sum()) == 0 for p in module.parameters())
    assert all(n.grad is not None and float(n.grad.abs().sum()) == 0 for n in nodes)
    assert sum("at least 2 samples" in r.message for r in caplog.records) == 1


class _Reached(Exception):
    pass


def _no_host_reads(monkeypatch):
    """Make every host read of a tensor value (.item(), bool(), int(), float(), .tolist()) raise."""
    def refuse(*args, **kwargs):
        raise AssertionError("host sync: a tensor value was read on the host")

    for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.parametrize("bsz", [1, 2])
def test_small_batch_decision_reads_no_tensor_value(monkeypatch, bsz):
    """B < 2 is decided from the shape: no .item()/bool() on a tensor, neither for B = 1 (the zero is built
    without one either) nor for B = 2 up to the point where the matching problems are built."""
    module = MultiGraphAlignmentLoss(DIM).train()
    nodes = _inputs(bsz)

    def reached(*args, **kwargs):
        raise _Reached

    monkeypatch.setattr(module, "build_problems", reached)
    with monkeypatch.context() as m:
        _no_host_reads(m)
        if bsz == 1:
            out = module(*nodes)
            out.loss.backward()
        else:
            with pytest.raises(_Reached):
                module(*nodes)
    if bsz == 1:
        assert torch.equal(out.loss.detach(), torch.tensor(0.0))
        assert all(p.grad is not None and not p.grad.any() for p in module.parameters())


@pytest.mark.parametrize("bsz", [2, 4])
def test_small_batches_use_b_minus_one_neighbours(bsz):
    module = MultiGraphAlignmentLoss(DIM).eval()
    nodes = _inputs(bsz)
    out = module(*nodes)
    out.loss.backward()
    expected = _reference_loss(module, [n.detach() for n in nodes], training=False)
    assert float(out.loss.detach()) == pytest.approx(expected["loss"], abs=1e-6)
    assert 0.0 <= float(out.loss.detach()) <= 2.0


def test_bf16_inputs_and_shape_errors():
    module = MultiGraphAlignmentLoss(DIM).eval()
    out = module(*_inputs(6, dtype=torch.bfloat16))
    assert out.loss.dtype == torch.float32
    with pytest.raises(ValueError, match="response"):
        module(torch.zeros(4, DIM), torch.zeros(5, DIM), torch.zeros(4, DIM))


def test_pool_tokens_masked_and_reference_mean():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool_tokens(hidden, mask)[0].tolist() == pytest.approx([104 / 3, 106 / 3])  # padding included
    assert pool_tokens(hidden, mask, masked=True).tolist() == [[2.0, 3.0]]
    assert pool_tokens(hidden, None, masked=True).tolist() == pool_tokens(hidden).tolist()
