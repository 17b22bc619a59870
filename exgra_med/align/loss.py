"""The ExGra-Med multi-graph alignment loss (METHOD section 4) and token pooling.

One step, for B samples with pooled image, response-text and extended-text nodes (B, D) each:
barycenter = mean of the three (not detached); node noise G ~ Gumbel(0, s) (B, B) drawn once and shared
by the six solves; for each modality m and each direction (m, bary), (bary, m): kNN graph on the first
graph's nodes (k = 5), topology shared by the second graph, shared GNN, unary costs
``c = -(cos + G - 0.5)``, quadratic costs ``q = -0.5 * (<e1_a, e2_b> + Gumbel(0, s) - 0.5)`` (fresh noise
per solve), partial graph matching with black-box gradients, Hamming loss ``sum|x - I| / B`` against the
identity. The loss is the mean over modalities of the mean over both directions.

The six problems, in this order: (image, bary), (bary, image), (response, bary), (bary, response),
(extended, bary), (bary, extended); the GNN encodes all twelve graphs as one disjoint union and all six
problems are solved in one batched call. Random draws come from a ``torch.Generator`` owned by the
module (one per device, seeded with ``seed``, plus the rank in local mode under torch.distributed so
that ranks draw different noise), in this order per step: node noise (B, B); the GNN dropout mask
(12 B, D) in training mode (see ``GraphEncoder``); edge noise (6, E, E).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from exgra_med.align.blackbox import blackbox_qap
from exgra_med.align.config import AlignmentConfig
from exgra_med.align.graphs import GraphEncoder, knn_graph

__all__ = ["MODALITIES", "AlignmentOutput", "MultiGraphAlignmentLoss", "gumbel", "pool_tokens"]

logger = logging.getLogger(__name__)

MODALITIES = ("image", "response", "extended")
_DEFAULTS = AlignmentConfig()  # the one declaration of every option's default


@dataclass
class AlignmentOutput:
    """Result of an alignment loss: the scalar to add (times alpha) to the LM loss, and its parts."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


def pool_tokens(hidden: torch.Tensor, mask: torch.Tensor | None = None, masked: bool = False) -> torch.Tensor:
    """Mean over tokens: (B, T, D) -> (B, D) in float32.

    ``masked=False`` reproduces the reference (every position, padding included); ``masked=True``
    averages only positions where mask (B, T) is nonzero (all positions when mask is None).
    """
    if hidden.dim() != 3:
        raise ValueError(f"pool_tokens expects hidden states (B, T, D), got shape {tuple(hidden.shape)}")
    hidden = hidden.float()
    if not masked or mask is None:
        return hidden.mean(1)
    if mask.shape != hidden.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match hidden states {tuple(hidden.shape)}")
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _host_exponential(shape: tuple[int, ...], generator: torch.Generator, chunk: int = 1 << 16) -> torch.Tensor:
    """Exp(1) draws in float32 as torch's CPU ``exponential_`` makes them, element for element, leaving the generator
    in the same state, about 3x faster. That kernel draws one 64-bit word per element, keeps its low 53 bits as a
    double u in [0, 1) and returns -log1p(-u), one element at a time; here the same steps run vectorised over chunks.
    `gumbel` uses it only after `_host_exponential_matches` has checked the equality on the running torch."""
    out = torch.empty(shape, dtype=torch.float32)
    flat = out.view(-1)
    words = torch.empty(min(chunk, flat.numel()), dtype=torch.int64)
    uniform = torch.empty(words.shape, dtype=torch.float64)
    for lo in range(0, flat.numel(), chunk):
        num = min(chunk, flat.numel() - lo)
        w, u = words[:num], uniform[:num]
        w.random_(generator=generator).bitwise_and_((1 << 53) - 1)  # random_ on int64: the word mod 2^63
        u.copy_(w).mul_(2.0 ** -53)
        flat[lo:lo + num] = u.neg_().log1p_().neg_()
    return out


@functools.cache
def _host_exponential_matches() -> bool:
    """Whether `_host_exponential` reproduces ``exponential_`` (values and generator state) on this torch build."""
    draws = []
    for vectorised in (False, True):
        gen = torch.Generator().manual_seed(20260101)
        e = _host_exponential((5000,), gen, chunk=1024) if vectorised else torch.empty(5000).exponential_(generator=gen)
        draws.append((e, gen.get_state()))
    return torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])


def gumbel(shape: tuple[int, ...], scale: float, generator: torch.Generator,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """Gumbel(0, scale) samples in float32 as ``-scale * log(E)``, E ~ Exp(1) drawn from generator."""
    if generator.device.type == "cpu" and torch.device(device).type == "cpu" and _host_exponential_matches():
        e = _host_exponential(shape, generator)  # the (6, E, E) edge noise is a tenth of a step at B = 128
    else:
        e = torch.empty(shape, device=device, dtype=torch.float32).exponential_(generator=generator)
    return e.clamp_min_(torch.finfo(torch.float32).tiny).log_().mul_(-scale)  # in place: no (6, E, E) temporaries


def _dist_info() -> tuple[bool, int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return True, torch.distributed.get_rank(), torch.distributed.get_world_size()
    return False, 0, 1


class MultiGraphAlignmentLoss(nn.Module):
    """Multi-graph alignment of image / response / extended-caption nodes through their barycenter.

    Args: dim: node feature size D; k: kNN neighbours (capped at B - 1); lambda_val: black-box
    interpolation strength; noise_scale: Gumbel scale of node and edge noise; dropout: GNN dropout;
    seed: seed of the module's generator; global_batch: all-gather the nodes of every rank (gradients
    flow back to the local slice) and align the global batch, with the same noise on every rank;
    scale_invariant_grad: choose lambda per problem as ``relative_lambda * (cost range) / max|upstream
    grad|`` (see ``exgra_med.align.blackbox``) so the gradient no longer saturates at lambda = 80 and scales
    with alpha; relative_lambda: that fraction; solver_kwargs: passed to ``solve_partial_qap``;
    undo_loss_scale: divide the solver's upstream gradient by ``loss_scale`` (set by the trainer each step under
    fp16 loss scaling) and multiply its gradient by it, so that the black-box gradient keeps its nominal size.
    The options are declared, with their defaults, in ``exgra_med.align.config.AlignmentConfig``.

    Batches of fewer than 2 samples (after the global gather, when on) have no graph to match: the loss and every
    part are then an exact zero that stays in the autograd graph (connected to the inputs and the GNN, so DDP and
    ZeRO see every parameter used; all gradients are zeros). The decision reads the batch shape only, a Python int,
    so it never waits on the device; a warning is logged the first time it happens.
    """

    def __init__(self, dim: int, k: int = _DEFAULTS.k, lambda_val: float = _DEFAULTS.lambda_val,
                 noise_scale: float = _DEFAULTS.noise_scale, dropout: float = _DEFAULTS.dropout,
                 seed: int = _DEFAULTS.seed, global_batch: bool = _DEFAULTS.global_batch,
                 scale_invariant_grad: bool = _DEFAULTS.scale_invariant,
                 relative_lambda: float = _DEFAULTS.relative_lambda, solver_kwargs: dict | None = None,
                 undo_loss_scale: bool = _DEFAULTS.undo_loss_scale) -> None:
        super().__init__()
        if dim <= 0 or k <= 0:
            raise ValueError(f"dim and k must be positive, got dim={dim}, k={k}")
        if lambda_val <= 0 or relative_lambda <= 0 or noise_scale < 0:
            raise ValueError(f"need lambda_val > 0, relative_lambda > 0, noise_scale >= 0; got {lambda_val}, "
                             f"{relative_lambda}, {noise_scale}")
        self.dim, self.k, self.lambda_val, self.noise_scale = dim, k, lambda_val, noise_scale
        self.seed, self.global_batch, self.scale_invariant_grad = seed, global_batch, scale_invariant_grad
        self.relative_lambda = relative_lambda
        self.undo_loss_scale = undo_loss_scale
        self.loss_scale = 1.0  # the factor the loss is multiplied by before backward (fp16 GradScaler), per step
        self.solver_kwargs = dict(solver_kwargs or {})
        self.gnn = GraphEncoder(dim, dropout=dropout)
        self._generators: dict[str, torch.Generator] = {}
        self._warned_single = False

    def reset_parameters(self) -> None:
        """Fresh GNN weights, as at construction."""
        self.gnn.reset_parameters()

    def generator_for(self, device: torch.device) -> torch.Generator:
        """The module's generator on device, created on first use (seed, + rank in local distributed mode)."""
        key = str(device)
        if key not in self._generators:
            is_dist, rank, _ = _dist_info()
            offset = rank if is_dist and not self.global_batch else 0
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed + offset)
        return self._generators[key]

    def get_rng_state(self) -> dict[str, torch.Tensor]:
        """The state of each generator used so far, by device (saved with training checkpoints)."""
        return {key: gen.get_state() for key, gen in self._generators.items()}

    def set_rng_state(self, states: dict[str, torch.Tensor]) -> None:
        """Continue the noise and dropout draws of a checkpointed run exactly (inverse of `get_rng_state`)."""
        for key, state in states.items():
            self.generator_for(torch.device(key)).set_state(state)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        is_dist, _, world = _dist_info()
        if not self.global_batch or not is_dist or world == 1:
            return x
        # lazy: torch.distributed's autograd collectives, only for --align_global_batch under torch.distributed
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x.contiguous()), dim=0)  # (world * B, D), differentiable

    def _connected_zero(self, inputs: tuple[torch.Tensor, ...]) -> AlignmentOutput:
        """The loss of a batch too small to align: 0, connected to every input and GNN parameter (zero gradients)
        so that DDP / ZeRO see all parameters used; built without reading any tensor value on the host."""
        total = sum(t.float().sum() for t in inputs) + sum(p.float().sum() for p in self.parameters())
        zero = 0.0 * total
        return AlignmentOutput(loss=zero, parts={m: zero for m in MODALITIES})

    def build_problems(self, image: torch.Tensor, response: torch.Tensor,
                       extended: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The six matching problems of a step: unary (6, B, B), quadratic (6, E, E), edges (6, 2, E).

        Inputs are (B, D) node sets, already gathered; costs are float32 and differentiable. Draws the
        step's noise from the module generator.
        """
        nodes = [t.float() for t in (image, response, extended)]
        bsz, device = nodes[0].shape[0], nodes[0].device
        gen = self.generator_for(device)
        bary = (nodes[0] + nodes[1] + nodes[2]) / 3.0  # (B, D), not detached
        node_noise = gumbel((bsz, bsz), self.noise_scale, gen, device)
        # Six problems: (image, bary), (bary, image), (response, bary), (bary, response), (extended, ...).
        first = torch.stack([t for m in nodes for t in (m, bary)])  # (6, B, D)
        second = torch.stack([t for m in nodes for t in (bary, m)])
        topo = knn_graph(torch.stack([*nodes, bary]), self.k)  # (4, 2, E): kNN on each graph-1 node set
        # (6, 2, E); graph 2 reuses graph 1's topology (stacked views: no index tensor to copy to a device)
        edges = torch.stack([topo[0], topo[3], topo[1], topo[3], topo[2], topo[3]])
        enc = self.gnn(first, second, edges, generator=gen)
        # -(cos + G - 0.5) and -0.5 (<e1, e2> + G - 0.5), in place on the products (no (6, E, E) temporaries)
        unary = (enc.nodes1 @ enc.nodes2.transpose(1, 2)).add_(node_noise).sub_(0.5).neg_()  # (6, B, B)
        num_e = edges.shape[2]
        edge_noise = gumbel((6, num_e, num_e), self.noise_scale, gen, device)
        quadratic = (enc.edges1 @ enc.edges2.transpose(1, 2)).add_(edge_noise).sub_(0.5).mul_(-0.5)  # (6, E, E)
        return unary, quadratic, edges

    def forward(self, image: torch.Tensor, response: torch.Tensor, extended: torch.Tensor) -> AlignmentOutput:
        """Alignment loss of pooled nodes image, response, extended (B, D) each; parts: per modality.

        B < 2: an exact, graph-connected zero (see the class docstring), decided from the shape alone.
        """
        for name, t in zip(MODALITIES, (image, response, extended)):
            if t.dim() != 2 or t.shape != image.shape or t.shape[1] != self.dim:
                raise ValueError(f"{name} nodes must be (B, {self.dim}) like image {tuple(image.shape)}; "
                                 f"got {tuple(t.shape)}")
        nodes = [self._gather(t) for t in (image, response, extended)]
        bsz = int(nodes[0].shape[0])  # from the shape: no device sync
        if bsz < 2:
            if not self._warned_single:
                logger.warning("alignment loss needs at least 2 samples per batch; got %d, the alignment loss is 0 "
                               "for such batches (gradients are zeros)", bsz)
                self._warned_single = True
            return self._connected_zero((image, response, extended))
        unary, quadratic, edges = self.build_problems(*nodes)
        x, _ = blackbox_qap(unary, quadratic, edges, edges, lambda_val=self.lambda_val,
                            scale_invariant=self.scale_invariant_grad, relative_lambda=self.relative_lambda,
                            solver_kwargs=self.solver_kwargs,
                            grad_scale=self.loss_scale if self.undo_loss_scale else 1.0)
        target = torch.eye(bsz, device=x.device, dtype=x.dtype)
        # x(1 - I) + (1 - x) I, not |x - I|: same value, but a gradient that is nonzero where x == I.
        hamming = (x * (1 - target) + (1 - x) * target).sum((1, 2)) / bsz  # (6,)
        per_modality = hamming.view(3, 2).mean(1)
        parts = {m: per_modality[i] for i, m in enumerate(MODALITIES)}
        return AlignmentOutput(loss=per_modality.mean(), parts=parts)
