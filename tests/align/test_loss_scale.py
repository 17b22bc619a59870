"""fp16 loss scaling and the black-box gradient: the reference's dynamics (the alignment gradient is 1/S of
nominal after unscaling) by default, the nominal gradient with `undo_loss_scale`; and the trainer's loss scale."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from exgra_med.align.config import AlignmentConfig, build_alignment_loss
from exgra_med.train.trainer import ExGraMedTrainer

S = 2.0**16  # torch's GradScaler starts at this scale


def _node_gradients(undo: bool, loss_scale: float) -> torch.Tensor:
    """d(alpha * align)/d(nodes) of a tiny alignment head (B = 6, D = 8) after backward of the loss times
    `loss_scale` and the optimiser's unscaling (division by it), as GradScaler does."""
    config = AlignmentConfig(contrastive=True, multi_graph=True, undo_loss_scale=undo, dropout=0.0, seed=3)
    torch.manual_seed(0)  # the GNN's initial weights
    head = build_alignment_loss(config, dim=8)
    head.loss_scale = loss_scale  # what the trainer sets each step
    gen = torch.Generator().manual_seed(0)
    nodes = [torch.randn(6, 8, generator=gen).requires_grad_(True) for _ in range(3)]
    loss = config.alpha * head(*nodes).loss
    (loss * loss_scale).backward()
    return torch.cat([n.grad for n in nodes]) / loss_scale


def test_reference_dynamics_shrink_the_alignment_gradient_by_the_loss_scale():
    nominal = _node_gradients(undo=False, loss_scale=1.0)  # bf16 / fp32: no loss scaling
    assert nominal.abs().max() > 1e-3
    # The default, what the reference's --fp16 runs got: the scaled upstream gradient saturates the perturbed
    # solve, so the gradient before unscaling does not depend on S, and after unscaling it is 1/S of nominal.
    reference = _node_gradients(undo=False, loss_scale=S)
    torch.testing.assert_close(reference * S, _node_gradients(undo=False, loss_scale=4 * S) * 4 * S)
    assert 0.5 < float((reference * S).norm() / nominal.norm()) < 2.0
    assert float(reference.norm() / nominal.norm()) < 1e-4
    # --align_undo_loss_scale True: the nominal gradient under any loss scale.
    assert torch.equal(_node_gradients(undo=True, loss_scale=S), nominal)
    assert torch.equal(_node_gradients(undo=True, loss_scale=1.0), nominal)


def test_trainer_reads_the_loss_scale_of_its_scaler():
    scaler = torch.amp.GradScaler("cpu", init_scale=S)
    fake = SimpleNamespace(accelerator=SimpleNamespace(scaler=scaler), deepspeed=None)
    assert ExGraMedTrainer._loss_scale(fake) == S
    deepspeed = SimpleNamespace(optimizer=SimpleNamespace(cur_scale=1024.0))
    assert ExGraMedTrainer._loss_scale(SimpleNamespace(accelerator=SimpleNamespace(scaler=None),
                                                       deepspeed=deepspeed)) == 1024.0
    assert ExGraMedTrainer._loss_scale(SimpleNamespace(accelerator=SimpleNamespace(scaler=None),
                                                       deepspeed=None)) == 1.0


def test_flag_is_generated_and_defaults_to_the_reference():
    from exgra_med.train.args import ModelArguments

    args = ModelArguments(model_name_or_path="m", align_undo_loss_scale=True, contrastive=True, multi_graph=True)
    assert args.alignment_config(seed=0).undo_loss_scale is True
    assert AlignmentConfig().undo_loss_scale is False
    with pytest.raises(ValueError, match="grad_scale"):
        from exgra_med.align.blackbox import blackbox_qap

        blackbox_qap(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), torch.zeros(2, 2, dtype=torch.long),
                     torch.zeros(2, 2, dtype=torch.long), grad_scale=0.0)
