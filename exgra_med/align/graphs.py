"""Graphs over the samples of a batch: kNN topology, edge features, and the shared GNN encoder.

Semantics follow the reference (``torch_geometric.nn.knn_graph(x, k, loop=False,
flow="target_to_source")`` on the first graph's raw node features):
- edge ``(i, j)`` means "j is one of the k nearest neighbours of i" (Euclidean), so ``edge_index[0]``
  holds the query node and ``edge_index[1]`` its neighbour; edges are sorted by query node, then by
  distance (ties: lower index first);
- the second graph reuses the first graph's topology;
- the GNN passes messages along ``edge_index`` as given (source = row 0, target = row 1, the PyG
  default), so a node aggregates from the nodes that chose it as a neighbour;
- edge features are ``x[edge_index[0]] - x[edge_index[1]]`` of the GNN outputs; nodes and edges are
  then L2-normalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import GraphConv
from torch_geometric.nn.aggr import MaxAggregation

__all__ = ["EncodedGraphs", "GraphEncoder", "edge_features", "effective_k", "knn_graph"]


def effective_k(num_nodes: int, k: int) -> int:
    """Neighbours per node actually used: k, capped at num_nodes - 1 (a batch of B <= k gives B - 1)."""
    return max(0, min(k, num_nodes - 1))


def knn_graph(x: torch.Tensor, k: int) -> torch.Tensor:
    """Directed kNN graph without self loops over the rows of x (n, D) -> edge_index (2, n * k') long.

    Batched: x (P, n, D) -> (P, 2, n * k'). k' = min(k, n - 1). No gradient; distances in float32.
    """
    if x.dim() not in (2, 3):
        raise ValueError(f"knn_graph expects node features (n, D) or (P, n, D), got shape {tuple(x.shape)}")
    if x.dim() == 2:
        return knn_graph(x[None], k)[0]
    n = x.shape[1]
    kk = effective_k(n, k)
    if kk == 0:
        return torch.zeros(x.shape[0], 2, 0, dtype=torch.long, device=x.device)
    with torch.no_grad():
        xf = x.detach().float()
        dist = torch.cdist(xf, xf, compute_mode="donot_use_mm_for_euclid_dist")  # (P, n, n)
        dist.diagonal(dim1=1, dim2=2).fill_(torch.inf)
        # Stable sort gives a deterministic order for tied distances (lower index first).
        order = torch.sort(dist, dim=2, stable=True).indices[:, :, :kk]  # (P, n, k')
    query = torch.arange(n, device=x.device).repeat_interleave(kk).expand(x.shape[0], -1)
    return torch.stack([query, order.reshape(x.shape[0], -1)], dim=1)


def edge_features(x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
    """Edge features x[source] - x[target]: (E, D)."""
    return x.index_select(0, edge_index[0]) - x.index_select(0, edge_index[1])  # faster than x[idx], same values


class _ScatterMax(torch.autograd.Function):
    """Feature-wise max of rows x (E, D) per index into (n, D), as torch_geometric computes it (``scatter_reduce_``
    "amax" onto zeros, include_self=False), with torch's gradient formula (ties share the gradient evenly; the zeros
    count as a tie where the max is 0) restricted to x: torch's backward also builds the discarded gradient of the
    zeros, which costs as much again."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:  # type: ignore[override]
        rows = index[:, None].expand_as(x)
        out = x.new_zeros(dim_size, x.shape[1]).scatter_reduce_(0, rows, x, reduce="amax", include_self=False)
        ctx.save_for_backward(x, index, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, index, out = ctx.saved_tensors
        rows = index[:, None].expand_as(x)
        is_max = x == out.gather(0, rows)
        ties = (out == 0).to(x.dtype).scatter_add_(0, rows, is_max.to(x.dtype))
        return is_max * (grad / ties).gather(0, rows), None, None


class _MaxAggregation(MaxAggregation):
    """torch_geometric's max aggregation with the leaner backward of `_ScatterMax` (same values and gradients)."""

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None, ptr: torch.Tensor | None = None,
                dim_size: int | None = None, dim: int = -2) -> torch.Tensor:
        if index is None or ptr is not None or dim_size is None or x.dim() != 2 or dim not in (0, -2):
            return super().forward(x, index, ptr, dim_size, dim)
        return _ScatterMax.apply(x, index, dim_size)


@dataclass
class EncodedGraphs:
    """GNN outputs of P graph pairs, each pair sharing one topology, L2-normalised, float32."""

    nodes1: torch.Tensor  # (P, n, D)
    nodes2: torch.Tensor  # (P, n, D)
    edges1: torch.Tensor  # (P, E, D)
    edges2: torch.Tensor  # (P, E, D)


class GraphEncoder(nn.Module):
    """GraphConv(D->D, max) -> ReLU -> GraphConv(D->D, max) -> ReLU -> dropout, shared by all graphs.

    Dropout masks come from the ``generator`` passed to forward when one is given (one draw of shape
    (2 * P * n, D) per call, rows in the order graph 1 of pair 0, graph 2 of pair 0, graph 1 of pair 1, ...),
    so a seeded loss module is reproducible without touching the global RNG.
    """

    def __init__(self, dim: int, dropout: float = 0.1, aggr: str = "max") -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.conv1 = GraphConv(dim, dim, aggr=_MaxAggregation() if aggr == "max" else aggr)
        self.conv2 = GraphConv(dim, dim, aggr=_MaxAggregation() if aggr == "max" else aggr)
        self.dropout = dropout

    def reset_parameters(self) -> None:
        """Fresh weights, as at construction (torch_geometric's own initialisation of both convolutions)."""
        self.conv1.reset_parameters()
        self.conv2.reset_parameters()

    def _dropout(self, h: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if not self.training or self.dropout == 0.0:
            return h
        if generator is None:
            return F.dropout(h, self.dropout, training=True)
        keep = torch.rand(h.shape, generator=generator, device=h.device, dtype=torch.float32) >= self.dropout
        return h * keep.to(h.dtype) / (1.0 - self.dropout)

    def encode(self, x: torch.Tensor, edge_index: torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Node features after message passing (n, D) for one graph (or a disjoint union of graphs)."""
        h = self.conv1(x, edge_index).relu()
        h = self.conv2(h, edge_index).relu()
        return self._dropout(h, generator)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, edge_index: torch.Tensor,
                generator: torch.Generator | None = None) -> EncodedGraphs:
        """Encode P pairs at once: x1, x2 (P, n, D) with topologies edge_index (P, 2, E), as one union graph."""
        if x1.dim() != 3 or x1.shape != x2.shape or edge_index.dim() != 3:
            raise ValueError(f"expected x1, x2 (P, n, D) and edge_index (P, 2, E); got {tuple(x1.shape)}, "
                             f"{tuple(x2.shape)}, {tuple(edge_index.shape)}")
        pairs, n, dim = x1.shape
        num_e = edge_index.shape[2]
        dtype = self.conv1.lin_rel.weight.dtype
        union = torch.stack([x1, x2], dim=1).reshape(2 * pairs * n, dim).to(dtype)  # (2Pn, D)
        offsets = torch.arange(2 * pairs, device=x1.device).view(pairs, 2, 1, 1) * n
        union_edges = (edge_index[:, None] + offsets).permute(2, 0, 1, 3).reshape(2, -1)  # (2, 2PE)
        h = self.encode(union, union_edges, generator)
        e = edge_features(h, union_edges)
        h1, h2 = F.normalize(h.float(), dim=1).view(pairs, 2, n, -1).unbind(1)  # unbind: one backward copy
        e1, e2 = F.normalize(e.float(), dim=1).view(pairs, 2, num_e, -1).unbind(1)
        return EncodedGraphs(nodes1=h1, nodes2=h2, edges1=e1, edges2=e2)
