"""Black-box gradients of the solver against their definition (Vlastelica et al. 2020)."""

from __future__ import annotations

import torch

from exgra_med.align.blackbox import blackbox_qap
from exgra_med.align.qap import paid_edge_pairs
from tests.align.instances import method_instance


def _hamming(x: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(x.shape[-1])
    return (x * (1 - eye) + (1 - x) * eye).sum((1, 2)) / x.shape[-1]


def test_two_by_two_sign_case():
    edges = torch.tensor([[[0, 1], [1, 0]]])
    unary = torch.tensor([[[-1.0, -2.0], [-2.0, -1.0]]], requires_grad=True)  # optimum: the swap
    quadratic = torch.zeros(1, 2, 2, requires_grad=True)
    x, _ = blackbox_qap(unary, quadratic, edges, edges, lambda_val=4.0)
    assert x.tolist() == [[[0.0, 1.0], [1.0, 0.0]]]
    loss = _hamming(x).sum()
    assert float(loss.detach()) == 2.0
    loss.backward()
    # dL/dx = (1 - 2I) / 2; c' = c + 4 dL/dx = [[-3, 0], [0, -3]] -> x' = I; dL/dc = -(x - I) / 4.
    assert unary.grad.tolist() == [[[0.25, -0.25], [-0.25, 0.25]]]
    # Paid pairs: the swap maps edge (0,1) onto (1,0) and back: z = [[0,1],[1,0]]; z' = I.
    assert quadratic.grad.tolist() == [[[0.25, -0.25], [-0.25, 0.25]]]


def test_saturated_case_gives_identity_difference_exactly():
    unary, quadratic, edges = method_instance(6, 16, seed=3, shared=0.0)
    unary.requires_grad_(True)
    quadratic.requires_grad_(True)
    x, _ = blackbox_qap(unary, quadratic, edges, edges, lambda_val=80.0)
    _hamming(x).sum().backward()
    eye = torch.eye(6)[None]
    assert torch.equal(unary.grad, (eye - x) / 80.0)
    z, z_eye = paid_edge_pairs(x, edges, edges), paid_edge_pairs(eye, edges, edges)
    assert torch.equal(quadratic.grad, (z_eye - z) / 80.0)


def test_gradient_descent_on_costs_lowers_the_hamming_loss():
    unary, quadratic, edges = method_instance(7, 16, seed=4, shared=0.0)
    unary = unary.clone().requires_grad_(True)
    losses = []
    for _ in range(8):
        x, _ = blackbox_qap(unary, quadratic, edges, edges, lambda_val=80.0)
        loss = _hamming(x).sum()
        losses.append(float(loss.detach()))
        unary.grad = None
        loss.backward()
        with torch.no_grad():
            unary -= 40.0 * unary.grad
    assert losses[0] > 0.0 and losses[-1] < losses[0] and losses[-1] == 0.0


def test_scale_invariant_gradient_scales_with_the_upstream_gradient():
    unary, quadratic, edges = method_instance(6, 16, seed=7, shared=0.0)
    grads = []
    for alpha in (1.0, 3.0):
        u = unary.clone().requires_grad_(True)
        x, _ = blackbox_qap(u, quadratic, edges, edges, scale_invariant=True, relative_lambda=0.5)
        (alpha * _hamming(x)).sum().backward()
        grads.append(u.grad)
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[1], 3.0 * grads[0], atol=1e-6)
