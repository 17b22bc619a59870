"""The ExGra-Med alignment objective, independent of LLaVA: graphs, QAP solver, black-box gradient, losses.

Names are imported on first use, so that reading the options (`exgra_med.align.config`) does not load
torch_geometric and the solver.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AlignmentConfig": "config",
    "build_alignment_loss": "config",
    "AlignmentOutput": "loss",
    "MultiGraphAlignmentLoss": "loss",
    "pool_tokens": "loss",
    "BlackBoxQAP": "blackbox",
    "blackbox_qap": "blackbox",
    "ContrastiveAlignmentLoss": "contrastive",
    "GraphEncoder": "graphs",
    "edge_features": "graphs",
    "knn_graph": "graphs",
    "paid_edge_pairs": "qap",
    "qap_objective": "qap",
    "solve_partial_qap": "qap",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
