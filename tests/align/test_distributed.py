"""global_batch under a real 2-process torchrun (gloo): every rank aligns the concatenated batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from exgra_med.align import MultiGraphAlignmentLoss
from tests.align.dist_worker import DIM, GLOBAL_B, SEED, global_batch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_global_batch_matches_single_process_loss(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).with_name("dist_worker.py")), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    torch.manual_seed(0)
    module = MultiGraphAlignmentLoss(DIM, seed=SEED).train()
    nodes = [t.clone().requires_grad_(True) for t in global_batch()]
    out = module(*nodes)
    out.loss.backward()
    local = GLOBAL_B // 2
    for r, res in enumerate(ranks):
        assert res["world"] == 2
        assert torch.allclose(res["loss"], out.loss.detach(), atol=1e-6)
        for name, value in out.parts.items():
            assert torch.allclose(res["parts"][name], value.detach(), atol=1e-6)
        # Both ranks backpropagate the same global loss; all_gather's backward sums them on each slice,
        # so the local gradient is world_size x the single-process one (DDP's averaging undoes it).
        for grad, full in zip(res["grads"], nodes):
            assert torch.allclose(grad, 2 * full.grad[r * local:(r + 1) * local], atol=1e-6)
    assert float(out.loss.detach()) > 0
