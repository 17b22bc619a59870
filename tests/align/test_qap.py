"""Optimality and validity of the batched partial-QAP solver against exhaustive enumeration."""

from __future__ import annotations

import importlib.util
import itertools
import math

import pytest
import torch

from exgra_med.align.qap import paid_edge_pairs, qap_objective, solve_partial_qap
from tests.align.instances import method_instance


def _is_partial_matching(x: torch.Tensor) -> bool:
    binary = bool(((x == 0) | (x == 1)).all())
    return binary and bool((x.sum(-1) <= 1).all()) and bool((x.sum(-2) <= 1).all())


def _naive_best(unary: torch.Tensor, quadratic: torch.Tensor, edges: torch.Tensor) -> float:
    """Independent enumeration with itertools (tiny n only): every injective partial map rows -> cols."""
    n = unary.shape[1]
    best = math.inf
    for choice in itertools.product(range(-1, n), repeat=n):
        used = [c for c in choice if c >= 0]
        if len(used) != len(set(used)):
            continue
        x = torch.zeros(1, n, n, dtype=torch.float64)
        for i, c in enumerate(choice):
            if c >= 0:
                x[0, i, c] = 1
        best = min(best, float(qap_objective(x, unary.double(), quadratic.double(), edges, edges)))
    return best


def test_exhaustive_backend_matches_itertools_enumeration():
    for seed in range(3):
        unary, quadratic, edges = method_instance(4, 8, seed, shared=0.0)
        x = solve_partial_qap(unary, quadratic, edges, edges, backend="exhaustive")
        value = float(qap_objective(x.double(), unary.double(), quadratic.double(), edges, edges))
        assert value == pytest.approx(_naive_best(unary, quadratic, edges), abs=1e-9)


def test_ipfp_reaches_the_optimum_on_method_instances():
    sizes = [5, 6, 7] * 11 + [8, 8, 8]  # 36 instances
    hits, total = 0, 0
    for seed, n in enumerate(sizes):
        unary, quadratic, edges = method_instance(n, 16, seed)
        x = solve_partial_qap(unary, quadratic, edges, edges)
        assert _is_partial_matching(x) and x.dtype == unary.dtype
        ref = solve_partial_qap(unary, quadratic, edges, edges, backend="exhaustive")
        assert _is_partial_matching(ref)
        value, best = (
            qap_objective(x, unary, quadratic, edges, edges),
            qap_objective(ref, unary, quadratic, edges, edges),
        )
        assert float(value) >= float(best) - 1e-5  # nothing beats enumeration
        hits += int(float(value) <= float(best) + 1e-5)
        total += 1
    assert hits / total >= 0.95, f"optimum on {hits}/{total}"


def test_batched_solve_equals_single_solves_and_allows_unmatched_nodes():
    problems = [method_instance(6, 8, seed) for seed in range(4)]
    unary = torch.cat([p[0] for p in problems])
    quadratic = torch.cat([p[1] for p in problems])
    edges = torch.cat([p[2] for p in problems])
    batched = solve_partial_qap(unary, quadratic, edges, edges)
    for b, (u, q, e) in enumerate(problems):
        single = solve_partial_qap(u, q, e, e)
        assert float(qap_objective(single, u, q, e, e)) == pytest.approx(
            float(qap_objective(batched[b : b + 1], u, q, e, e)), abs=1e-5
        )
    # All unary costs positive and no quadratic terms: the empty matching (cost 0) is optimal.
    x = solve_partial_qap(unary.abs() + 0.1, torch.zeros_like(quadratic), edges, edges)
    assert float(x.sum()) == 0.0


def test_paid_edge_pairs_and_objective_by_hand():
    # Graph 1 edge (0 -> 1); graph 2 edges (0 -> 1), (1 -> 0). Identity pays edge pair (0, 0) only.
    unary = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    quadratic = torch.tensor([[[10.0, 20.0]]])
    edges1 = torch.tensor([[[0], [1]]])
    edges2 = torch.tensor([[[0, 1], [1, 0]]])
    eye, swap = torch.eye(2)[None], torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    assert paid_edge_pairs(eye, edges1, edges2).tolist() == [[[1.0, 0.0]]]
    assert float(qap_objective(eye, unary, quadratic, edges1, edges2)) == 1 + 4 + 10
    assert float(qap_objective(swap, unary, quadratic, edges1, edges2)) == 2 + 3 + 20
    neg = -torch.ones(1, 2, 2)
    best = solve_partial_qap(neg, torch.tensor([[[-5.0, 3.0]]]), edges1, edges2, backend="exhaustive")
    assert best.tolist() == [[[1.0, 0.0], [0.0, 1.0]]]
    assert torch.equal(solve_partial_qap(neg, torch.tensor([[[-5.0, 3.0]]]), edges1, edges2), best)


def test_errors_name_the_problem():
    unary, quadratic, edges = method_instance(5, 8, 0)
    with pytest.raises(ValueError, match="unknown QAP backend"):
        solve_partial_qap(unary, quadratic, edges, edges, backend="nope")
    if importlib.util.find_spec("lpmp_py") is None:
        with pytest.raises(ImportError, match="lpmp_py"):
            solve_partial_qap(unary, quadratic, edges, edges, backend="lpmp")
    with pytest.raises(ValueError, match="edges1"):
        solve_partial_qap(unary, quadratic, edges[:, :, :-1], edges)
    loops = edges.clone()
    loops[0, 1, 0] = loops[0, 0, 0]
    with pytest.raises(ValueError, match="self loops"):
        solve_partial_qap(unary, quadratic, loops, edges)
