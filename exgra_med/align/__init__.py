"""The ExGra-Med alignment objective, independent of LLaVA: graphs, QAP solver, black-box gradient, losses."""

from exgra_med.align.blackbox import BlackBoxQAP, blackbox_qap
from exgra_med.align.contrastive import ContrastiveAlignmentLoss
from exgra_med.align.graphs import GraphEncoder, edge_features, knn_graph
from exgra_med.align.loss import AlignmentOutput, MultiGraphAlignmentLoss, pool_tokens
from exgra_med.align.qap import paid_edge_pairs, qap_objective, solve_partial_qap

__all__ = [
    "AlignmentOutput",
    "BlackBoxQAP",
    "ContrastiveAlignmentLoss",
    "GraphEncoder",
    "MultiGraphAlignmentLoss",
    "blackbox_qap",
    "edge_features",
    "knn_graph",
    "paid_edge_pairs",
    "pool_tokens",
    "qap_objective",
    "solve_partial_qap",
]
