"""The two arrangements of the solver's quadratic costs (`pairs="sparse"`, the default, and `pairs="dense"`, the
earlier table) answer the same queries and give the same matchings, losses and black-box gradients."""

from __future__ import annotations

import pytest
import torch

from exgra_med.align import MultiGraphAlignmentLoss
from exgra_med.align.pairs import DensePairTable, SparsePairTable, _first_copy
from exgra_med.align.qap import _local_search_dense, _local_search_sparse, qap_objective, solve_partial_qap


def _loss_problems(bsz: int, seed: int, dim: int = 32) -> tuple[torch.Tensor, ...]:
    """The six problems one training step builds at batch size bsz (seeded module and nodes)."""
    torch.manual_seed(seed)
    module = MultiGraphAlignmentLoss(dim, seed=seed).train()
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(bsz, dim, generator=gen)
    nodes = [base + torch.randn(bsz, dim, generator=gen) for _ in range(3)]
    with torch.no_grad():
        return module.build_problems(*nodes)


def _random_graph_with_parallel_edges(prob: int, n: int, num_e: int, seed: int) -> torch.Tensor:
    """Edges (P, 2, E) without self loops, with some parallel copies (kNN graphs have none; the tables merge them)."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(0, n, (prob, num_e), generator=gen)
    dst = (src + torch.randint(1, n, (prob, num_e), generator=gen)) % n
    edges = torch.stack([src, dst], 1)
    edges[:, :, -3:] = edges[:, :, :3]  # parallel copies of the first three edges
    return edges


def test_first_copy_is_the_first_equal_key():
    gen = torch.Generator().manual_seed(0)
    for num_e in (0, 1, 7, 40):
        key = torch.randint(0, max(1, num_e // 3), (3, num_e), generator=gen)
        expected = torch.tensor([[min(j for j in range(num_e) if key[p, j] == key[p, i]) for i in range(num_e)]
                                 for p in range(3)], dtype=torch.long).view(3, num_e)
        assert torch.equal(_first_copy(key), expected)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("ragged", [False, True])  # the host walks long lists as they are; an accelerator pads them
def test_sparse_table_answers_the_dense_tables_queries(parallel, ragged):
    if parallel:
        n, prob = 9, 3
        edges1 = _random_graph_with_parallel_edges(prob, n, 30, 1)
        edges2 = _random_graph_with_parallel_edges(prob, n, 25, 2)
        quadratic = torch.randn(prob, 30, 25, generator=torch.Generator().manual_seed(3))
    else:
        unary, quadratic, edges1 = _loss_problems(24, 0)
        edges2, (prob, n) = edges1, unary.shape[:2]
    dense, sparse = DensePairTable(quadratic, edges1, edges2, n, n), SparsePairTable(quadratic, edges1, edges2, n, n)
    sparse.ragged = [ragged, ragged]
    gen = torch.Generator().manual_seed(4)
    rows = torch.arange(prob).repeat(3)
    maps = torch.stack([torch.randperm(n + 1, generator=gen)[:n] for _ in rows])  # n: unmatched
    maps[0] = n  # the empty matching
    # Values that are read, not summed, agree bit for bit.
    assert torch.equal(sparse.quadratic_value(maps, rows), dense.quadratic_value(maps, rows))
    s, t, u, v = (torch.randint(0, hi, (len(rows), 50), generator=gen) for hi in (n, n, n + 1, n + 1))
    assert torch.equal(sparse.at_row(sparse.edge_row(rows, s, t), u, v), dense.at_row(dense.edge_row(rows, s, t), u, v))
    # Sums of the same nonzero terms, perhaps added in another order.
    grad = sparse.gradient(maps, rows)
    assert torch.allclose(grad, dense.gradient(maps, rows), rtol=0, atol=1e-5)
    assert torch.count_nonzero(grad[0]) == 0  # the empty matching has no quadratic gradient
    assert torch.allclose(sparse.uniform_gradient(), dense.uniform_gradient(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("check_every", [1, 8])
def test_local_searches_agree_bit_for_bit(check_every):
    unary, quadratic, edges = _loss_problems(32, 1)
    n = unary.shape[1]
    gen = torch.Generator().manual_seed(5)
    rows = torch.arange(6).repeat(2)
    starts = torch.stack([torch.randperm(n + 1, generator=gen)[:n] for _ in rows])  # far from optimal: many rounds
    for table in (DensePairTable, SparsePairTable):
        tab = table(quadratic, edges, edges, n, n)
        maps_d, value_d = _local_search_dense(unary[rows], tab, rows, starts, 40, check_every)
        maps_s, value_s = _local_search_sparse(unary[rows], tab, rows, starts, 40, check_every)
        assert torch.equal(maps_s, maps_d) and torch.equal(value_s, value_d)
        assert not torch.equal(maps_s, starts)


@pytest.mark.parametrize("bsz", [16, 64])
def test_solver_output_is_the_same_with_either_arrangement(bsz):
    for seed in range(2):
        unary, quadratic, edges = _loss_problems(bsz, seed)
        x_sparse = solve_partial_qap(unary, quadratic, edges, edges)  # default: sparse
        x_dense = solve_partial_qap(unary, quadratic, edges, edges, pairs="dense")
        assert torch.equal(x_sparse, x_dense)
        assert torch.equal(qap_objective(x_sparse, unary, quadratic, edges, edges),
                           qap_objective(x_dense, unary, quadratic, edges, edges))
    with pytest.raises(ValueError, match="pairs='csr'"):
        solve_partial_qap(unary, quadratic, edges, edges, pairs="csr")


@pytest.mark.parametrize("bsz", [16, 64])
def test_alignment_loss_and_black_box_gradients_are_the_same_with_either_arrangement(bsz):
    results = {}
    for pairs in ("dense", "sparse"):
        torch.manual_seed(0)
        module = MultiGraphAlignmentLoss(32, seed=0, solver_kwargs={"pairs": pairs}).train()
        gen = torch.Generator().manual_seed(1)
        base = torch.randn(bsz, 32, generator=gen)
        nodes = [(base + torch.randn(bsz, 32, generator=gen)).requires_grad_(True) for _ in range(3)]
        losses = []
        for _ in range(2):  # two steps: the second draws fresh noise from the module's generator
            out = module(*nodes)
            out.loss.backward()
            losses.append(out.loss.detach())
        results[pairs] = (losses, [t.grad for t in nodes], [p.grad for p in module.parameters()])
    (loss_d, nodes_d, params_d), (loss_s, nodes_s, params_s) = results["dense"], results["sparse"]
    assert all(torch.equal(a, b) for a, b in zip(loss_d, loss_s))
    assert all(torch.equal(a, b) for a, b in zip(nodes_d, nodes_s))
    assert all(torch.equal(a, b) for a, b in zip(params_d, params_s))
    assert any(g.abs().sum() > 0 for g in nodes_s)  # the black-box gradient reached the nodes


def test_gnn_max_aggregation_matches_torch_geometric_values_and_gradients():
    """The GNN's max aggregation (leaner backward) against torch_geometric's own, ties included: ReLU zeros tie with
    each other and with the zeros the reduction starts from."""
    from torch_geometric.utils import scatter

    from exgra_med.align.graphs import _MaxAggregation

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=gen)
    x[::3] = x[::3].relu()  # many exact zeros
    x[5], x[9] = x[7], x[7]  # equal rows sent to one node tie for its max
    index = torch.randint(0, 40, (200,), generator=gen)
    index[5], index[9] = index[7], index[7]
    index[:3] = 39  # node 38 (perhaps) and others without in-edges stay 0
    grad = torch.randn(41, 16, generator=gen)
    outs, grads = [], []
    reductions = (lambda t: scatter(t, index, 0, 41, reduce="max"), lambda t: _MaxAggregation()(t, index, dim_size=41))
    for reduce in reductions:
        t = x.clone().requires_grad_(True)
        out = reduce(t)
        out.backward(grad)
        outs.append(out)
        grads.append(t.grad)
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])
    assert (grads[1] != 0).float().mean() < 0.5  # only the maxima receive gradient


def test_gumbel_noise_is_the_exponential_draws_of_the_generator():
    """The vectorised host draws give torch's `exponential_` values and generator state, or are not used."""
    from exgra_med.align.loss import _host_exponential, _host_exponential_matches, gumbel

    tiny = torch.finfo(torch.float32).tiny
    for shape in ((7,), (6, 33, 33), (3, 300, 300)):  # the last spans several chunks
        ref_gen, gen = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
        expected = -0.05 * torch.log(torch.empty(shape).exponential_(generator=ref_gen).clamp_min(tiny))
        assert torch.equal(gumbel(shape, 0.05, gen), expected)
        assert torch.equal(gen.get_state(), ref_gen.get_state())
    ref_gen, gen = torch.Generator().manual_seed(12), torch.Generator().manual_seed(12)
    same = torch.equal(_host_exponential((70000,), gen, chunk=4096), torch.empty(70000).exponential_(generator=ref_gen))
    assert _host_exponential_matches() == same  # the check that guards the vectorised draws tells the truth
