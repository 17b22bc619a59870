"""Black-box differentiation of the graph-matching solver (Vlastelica, Paulus et al., ICLR 2020).

Forward solves the partial QAP. Backward re-solves with costs moved along the incoming gradient,
``c' = c + lambda * dL/dx`` and ``q' = q + lambda * dL/dz`` (z: the 0/1 mask of paid edge pairs), and
returns the finite-difference gradients ``dL/dc = -(x - x') / lambda`` and ``dL/dq = -(z - z') / lambda``.
All problems of a step are solved in one batched call, forward and backward.

``scale_invariant=True`` picks lambda per problem instead of using a fixed value:
``lambda_b = relative_lambda * (max c_b - min c_b) / max|dL/dx_b, dL/dz_b|``. The perturbation then moves
the largest cost entry by a fixed fraction of the unary cost range whatever the loss weight, so the
perturbed solution does not collapse onto the target (as it does at lambda = 80 with Hamming-loss
gradients of size 1/B), and the returned gradient scales linearly with the upstream gradient (with alpha).

``grad_scale`` S: the factor the loss was multiplied by before backward (fp16 loss scaling). The backward then
perturbs with the unscaled gradient ``dL/dx / S`` and returns S times the result, so that after the optimiser's
unscaling the gradient is what an unscaled run gets. With S = 1 (the default, and the reference) a loss scale
reaches the perturbation: at lambda = 80 the perturbed solution saturates and the returned gradient ignores S,
so after unscaling it is 1/S of nominal.
"""

from __future__ import annotations

import torch

from exgra_med.align.qap import paid_edge_pairs, solve_partial_qap

__all__ = ["BlackBoxQAP", "blackbox_qap"]


class BlackBoxQAP(torch.autograd.Function):
    """autograd.Function: (unary, quadratic, edges1, edges2, lambda_val, scale_invariant, relative_lambda,
    solver_kwargs, grad_scale) -> (x (B, n1, n2), z (B, E1, E2)) with black-box gradients for unary and quadratic."""

    @staticmethod
    def forward(ctx, unary: torch.Tensor, quadratic: torch.Tensor, edges1: torch.Tensor,  # type: ignore[override]
                edges2: torch.Tensor, lambda_val: float, scale_invariant: bool, relative_lambda: float,
                solver_kwargs: dict | None, grad_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs = dict(solver_kwargs or {})
        x = solve_partial_qap(unary, quadratic, edges1, edges2, **kwargs)
        z = paid_edge_pairs(x, edges1, edges2)
        ctx.save_for_backward(unary, quadratic, edges1, edges2, x, z)
        ctx.lambda_val, ctx.scale_invariant, ctx.relative_lambda = lambda_val, scale_invariant, relative_lambda
        ctx.solver_kwargs, ctx.grad_scale = kwargs, float(grad_scale)
        # An unused output (z, in the loss) gets None, not a (B, E1, E2) tensor of zeros to add.
        ctx.set_materialize_grads(False)
        return x, z

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor | None, grad_z: torch.Tensor | None):  # type: ignore[override]
        unary, quadratic, edges1, edges2, x, z = ctx.saved_tensors
        scale = ctx.grad_scale
        if grad_x is None and grad_z is None:
            return None, None, None, None, None, None, None, None, None
        # Zero gradients perturb nothing: q + lambda * 0 is q to the solver, which reads costs as 0 + q.
        grad_x = torch.zeros_like(unary) if grad_x is None else grad_x.to(unary.dtype)
        if scale != 1.0:  # x / 1 is x: skip the (B, E1, E2) passes in the usual case
            grad_x = grad_x / scale
            grad_z = None if grad_z is None else grad_z.to(quadratic.dtype) / scale
        elif grad_z is not None:
            grad_z = grad_z.to(quadratic.dtype)
        bsz = unary.shape[0]
        if ctx.scale_invariant:
            gmax = grad_x.abs().flatten(1).amax(1)  # (B,)
            if grad_z is not None:
                gmax = torch.maximum(gmax, grad_z.abs().flatten(1).amax(1))
            flat_c = unary.detach().flatten(1)
            spread = (flat_c.amax(1) - flat_c.amin(1)).clamp_min(1e-6)
            lam = torch.where(gmax > 0, ctx.relative_lambda * spread / gmax.clamp_min(1e-30),
                              torch.ones_like(gmax))
        else:
            lam = torch.full((bsz,), float(ctx.lambda_val), dtype=unary.dtype, device=unary.device)
        lam = lam.view(bsz, 1, 1)
        q_prime = quadratic.detach() if grad_z is None else quadratic.detach() + lam * grad_z
        x_prime = solve_partial_qap(unary.detach() + lam * grad_x, q_prime, edges1, edges2, **ctx.solver_kwargs)
        z_prime = paid_edge_pairs(x_prime, edges1, edges2)
        grad_unary = -(x - x_prime) / lam
        grad_quadratic = torch.sub(z, z_prime).neg_().div_(lam)  # -(z - z') / lambda, without temporaries
        if scale != 1.0:
            grad_unary, grad_quadratic = grad_unary * scale, grad_quadratic.mul_(scale)
        return grad_unary, grad_quadratic, None, None, None, None, None, None, None


def blackbox_qap(unary: torch.Tensor, quadratic: torch.Tensor, edges1: torch.Tensor, edges2: torch.Tensor,
                 lambda_val: float = 80.0, scale_invariant: bool = False, relative_lambda: float = 0.5,
                 solver_kwargs: dict | None = None, grad_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable batched partial QAP: returns (x, z); see the module docstring for the gradient."""
    if lambda_val <= 0 or relative_lambda <= 0 or grad_scale <= 0:
        raise ValueError(f"lambda_val, relative_lambda and grad_scale must be > 0, got {lambda_val}, "
                         f"{relative_lambda}, {grad_scale}")
    return BlackBoxQAP.apply(unary, quadratic, edges1, edges2, lambda_val, scale_invariant, relative_lambda,
                             solver_kwargs, grad_scale)
