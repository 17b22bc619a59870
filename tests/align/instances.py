"""QAP instances built with METHOD section 4's cost formulas, shared by the alignment tests."""

from __future__ import annotations

import torch

from exgra_med.align.graphs import GraphEncoder, knn_graph
from exgra_med.align.loss import gumbel


def method_instance(n: int, dim: int, seed: int, shared: float = 1.0) -> tuple[torch.Tensor, ...]:
    """One partial-QAP instance (unary (1,n,n), quadratic (1,E,E), edges (1,2,E)) built as the loss does.

    Random modality features with a shared per-sample component of weight `shared`, the barycenter,
    kNN graph on graph 1, a randomly initialised GNN, node and edge Gumbel(0, 0.05) noise.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = torch.randn(n, dim, generator=gen)
    mods = [shared * base + torch.randn(n, dim, generator=gen) for _ in range(3)]
    bary = sum(mods) / 3
    g1, g2 = (mods[0], bary) if seed % 2 == 0 else (bary, mods[seed % 3])
    edges = knn_graph(g1, 5)[None]
    enc = GraphEncoder(dim).eval()
    with torch.no_grad():
        out = enc(g1[None], g2[None], edges)
    unary = -(out.nodes1 @ out.nodes2.transpose(1, 2) + gumbel((n, n), 0.05, gen) - 0.5)
    num_e = edges.shape[2]
    quadratic = -0.5 * (out.edges1 @ out.edges2.transpose(1, 2) + gumbel((1, num_e, num_e), 0.05, gen) - 0.5)
    return unary, quadratic, edges
