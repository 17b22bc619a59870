"""Contrastive ablations (InfoNCE / SigLIP over average or OT similarity) on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from exgra_med.align import ContrastiveAlignmentLoss

IMAGE = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])  # pooled: e1, e2
TEXT = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [5.0, 5.0]]])
MASK = torch.tensor([[1, 1], [1, 0]])  # the second text's last token is padding
# average similarity: [[mean(1, 0), cos(e1, e2)], [mean(0, 1), 1]]
SIM = [[0.5, 0.0], [0.5, 1.0]]


def _log_sigmoid(v: float) -> float:
    return -math.log1p(math.exp(-v))


def test_average_similarity_and_infonce():
    loss_fn = ContrastiveAlignmentLoss(2, loss_type="infonce", simi_type="average")
    assert loss_fn.similarity(IMAGE, TEXT, MASK).tolist() == SIM
    s = 1 / 0.07
    row0 = -math.log(math.exp(0.5 * s) / (math.exp(0.5 * s) + 1.0))
    row1 = -math.log(math.exp(s) / (math.exp(0.5 * s) + math.exp(s)))
    out = loss_fn(IMAGE, TEXT, MASK)
    assert float(out.loss.detach()) == pytest.approx((row0 + row1) / 2, rel=1e-4)  # float32 logits
    out.loss.backward()
    assert loss_fn.logit_scale.grad is not None


def test_siglip_with_learnable_bias():
    loss_fn = ContrastiveAlignmentLoss(2, loss_type="siglip", simi_type="average")
    logits = [[10 * v - 10 for v in row] for row in SIM]  # scale 10, bias -10
    signs = [[1, -1], [-1, 1]]
    expected = -sum(_log_sigmoid(signs[i][j] * logits[i][j]) for i in range(2) for j in range(2)) / 2
    out = loss_fn(IMAGE, TEXT, MASK)
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)
    out.loss.backward()
    assert loss_fn.bias.grad is not None


def test_optimal_transport_similarity():
    loss_fn = ContrastiveAlignmentLoss(2, simi_type="OT")
    # One image token: the plan is forced to the text marginal, so OT equals the average similarity.
    sim = loss_fn.similarity(IMAGE[:, :1], TEXT, MASK)
    assert torch.allclose(sim, torch.tensor(SIM), atol=1e-6)
    # Orthogonal tokens on both sides: plan = K / sum(K) with K = [[1, e^-10], [e^-10, 1]].
    eye = torch.eye(2)[None]
    assert float(loss_fn.similarity(eye, eye)) == pytest.approx(1 / (1 + math.exp(-10)), rel=1e-6)


def test_rejects_unknown_types():
    with pytest.raises(ValueError, match="loss_type"):
        ContrastiveAlignmentLoss(2, loss_type="triplet")
    with pytest.raises(ValueError, match="simi_type"):
        ContrastiveAlignmentLoss(2, simi_type="max")
