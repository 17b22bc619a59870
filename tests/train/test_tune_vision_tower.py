"""`--tune_vision_tower True` on this project's LLaVA-style model (the native path: tests/vlm/test_train.py): the tower
trains with the projector and the LLM, and its gradient reaches it; by default (the reference) it stays frozen."""

from __future__ import annotations

import torch

from exgra_med.model.checkpoint import load_model
from exgra_med.train.args import ModelArguments
from exgra_med.train.llava import set_trainable


def test_the_tower_trains_only_when_asked(tiny_model_dir):
    for tune in (False, True):
        model, _, _ = load_model(tiny_model_dir, dtype=torch.float32)
        set_trainable(model, ModelArguments(model_name_or_path=str(tiny_model_dir), tune_vision_tower=tune))
        tower = [p.requires_grad for p in model.vision_tower.parameters()]
        assert all(tower) if tune else not any(tower)
        assert all(p.requires_grad for p in model.mm_projector.parameters())
        if tune:  # the tower's forward is no longer cut from the graph
            size = model.vision_tower.image_size
            model.get_image_features(torch.randn(2, 3, size, size)).pow(2).mean().backward()
            reached = {n for n, p in model.vision_tower.named_parameters() if p.grad is not None}
            assert any("patch_embedding" in n for n in reached)  # down to the first layer
