"""Contrastive alignment ablations of the reference: InfoNCE or SigLIP over image / response-text pairs.

Pairs: the projected image tokens of sample i and the response-text tokens of sample j (the reference's
``align_image_features`` and ``align_input_embeds``). Similarity ``simi_type``:
- ``"average"``: cosine between the mean-pooled image and every text token, averaged over text tokens;
- ``"OT"``: the entropic optimal-transport plan (Sinkhorn, eps 0.1, uniform marginals, plan not
  differentiated) between image tokens and text tokens over the cost ``1 - cos``, then ``sum(plan * cos)``.
Logits are ``exp(logit_scale) * similarity`` (+ bias for SigLIP). InfoNCE: cross-entropy of each image
row against its own text. SigLIP: ``-sum(log sigmoid((2I - 1) * logits)) / B``.
Text padding is excluded when ``text_mask`` is given; the reference averaged over padding too (pass
``text_mask=None`` for that behaviour).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from exgra_med.align.config import CONTRASTIVE_LOSS_TYPES, SIMILARITY_TYPES, AlignmentConfig
from exgra_med.align.loss import AlignmentOutput

__all__ = ["ContrastiveAlignmentLoss", "sinkhorn_plan"]

_DEFAULTS = AlignmentConfig()  # the one declaration of every option's default


def sinkhorn_plan(kernel: torch.Tensor, row_mass: torch.Tensor, col_mass: torch.Tensor, max_iter: int = 500,
                  tol: float = 1e-4, check_every: int = 10) -> torch.Tensor:
    """Transport plans diag(r) K diag(c) for batched kernels (..., N, T) with marginals (..., N), (..., T).

    Stops when the mean change of the row scaling falls below tol for every problem (checked every
    ``check_every`` iterations, the only host syncs), or after max_iter iterations.
    """
    r, c = torch.ones_like(row_mass), torch.ones_like(col_mass)
    for it in range(max_iter):
        r_prev = r
        r = row_mass / (kernel @ c.unsqueeze(-1)).squeeze(-1)
        c = col_mass / (kernel.transpose(-1, -2) @ r.unsqueeze(-1)).squeeze(-1)
        if (it + 1) % check_every == 0 and bool(((r - r_prev).abs().mean(-1) < tol).all()):
            break
    return r.unsqueeze(-1) * kernel * c.unsqueeze(-2)


class ContrastiveAlignmentLoss(nn.Module):
    """InfoNCE / SigLIP alignment between image tokens and text tokens (reference ablations).

    ``logit_scale`` starts at log(1 / 0.07) for InfoNCE (CLIP) and log(10) for SigLIP, ``bias`` at -10
    (SigLIP paper); both are learnable.
    """

    def __init__(self, dim: int, loss_type: str = _DEFAULTS.contrastive_loss_type,
                 simi_type: str = _DEFAULTS.simi_type, ot_eps: float = _DEFAULTS.ot_eps,
                 ot_max_iter: int = _DEFAULTS.ot_max_iter) -> None:
        super().__init__()
        if loss_type not in CONTRASTIVE_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {CONTRASTIVE_LOSS_TYPES}, got {loss_type!r}")
        if simi_type not in SIMILARITY_TYPES:
            raise ValueError(f"simi_type must be one of {SIMILARITY_TYPES}, got {simi_type!r}")
        self.dim, self.loss_type, self.simi_type = dim, loss_type, simi_type
        self.ot_eps, self.ot_max_iter = ot_eps, ot_max_iter
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.bias = nn.Parameter(torch.empty(())) if loss_type == "siglip" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The initial temperature (and SigLIP bias) named in the class docstring."""
        with torch.no_grad():
            self.logit_scale.fill_(math.log(1 / 0.07) if self.loss_type == "infonce" else math.log(10.0))
            if self.bias is not None:
                self.bias.fill_(-10.0)

    def similarity(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                   text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Similarity matrix (B_image, B_text), float32, before scaling."""
        img = image_tokens.float()
        txt = F.normalize(text_tokens.float(), dim=-1)  # (B, T, D)
        mask = (torch.ones(txt.shape[:2], device=txt.device) if text_mask is None
                else text_mask.to(device=txt.device, dtype=torch.float32))  # (B, T)
        if self.simi_type == "average":
            pooled = F.normalize(img.mean(1), dim=-1)  # (B, D)
            cos = torch.einsum("id,jtd->ijt", pooled, txt)  # (B, B, T)
            return (cos * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
        img = F.normalize(img, dim=-1)  # (B, N, D)
        cos = torch.einsum("ind,jtd->ijnt", img, txt)  # (B, B, N, T)
        with torch.no_grad():
            kernel = torch.exp(-(1.0 - cos) / self.ot_eps)  # padding columns get zero mass below
            row_mass = torch.full(cos.shape[:3], 1.0 / img.shape[1], device=cos.device)
            col_mass = (mask / mask.sum(-1, keepdim=True).clamp_min(1.0))[None].expand(cos.shape[0], -1, -1)
            plan = sinkhorn_plan(kernel, row_mass, col_mass, max_iter=self.ot_max_iter)
        return (plan * cos).sum((-1, -2))

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                text_mask: torch.Tensor | None = None) -> AlignmentOutput:
        """image_tokens (B, N, D), text_tokens (B, T, D), text_mask (B, T) or None -> AlignmentOutput."""
        if image_tokens.dim() != 3 or text_tokens.dim() != 3 or image_tokens.shape[0] != text_tokens.shape[0]:
            raise ValueError(f"expected image (B, N, D) and text (B, T, D) tokens, got {tuple(image_tokens.shape)}"
                             f" and {tuple(text_tokens.shape)}")
        if image_tokens.shape[-1] != self.dim or text_tokens.shape[-1] != self.dim:
            raise ValueError(f"token features must have size {self.dim}")
        logits = self.logit_scale.exp() * self.similarity(image_tokens, text_tokens, text_mask)  # (B, B)
        bsz = logits.shape[0]
        if self.loss_type == "infonce":
            loss = F.cross_entropy(logits, torch.arange(bsz, device=logits.device))
        else:
            labels = 2 * torch.eye(bsz, device=logits.device) - 1
            loss = -F.logsigmoid(labels * (logits + self.bias)).sum() / bsz
        # One part: the loss between the image and the response-text modality (the only pair it aligns).
        return AlignmentOutput(loss=loss, parts={"image_response": loss})
