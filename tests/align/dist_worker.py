"""Worker launched by test_distributed.py under `torch.distributed.run` (gloo): global-batch alignment.

Each rank takes its slice of a fixed global batch, computes the loss with global_batch=True, and writes
the loss, its parts and the gradient of its local inputs to <out_dir>/rank<r>.pt.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from exgra_med.align import MultiGraphAlignmentLoss

DIM, GLOBAL_B, SEED = 16, 8, 5


def global_batch() -> list[torch.Tensor]:
    """The fixed global batch (image, response, extended), each (GLOBAL_B, DIM)."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(GLOBAL_B, DIM, generator=gen)
    return [base + torch.randn(GLOBAL_B, DIM, generator=gen) for _ in range(3)]


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same GNN initialisation on every rank
    module = MultiGraphAlignmentLoss(DIM, seed=SEED, global_batch=True).train()
    local = GLOBAL_B // world
    nodes = [t[rank * local:(rank + 1) * local].clone().requires_grad_(True) for t in global_batch()]
    out = module(*nodes)
    out.loss.backward()
    result = {"loss": out.loss.detach(), "parts": {k: v.detach() for k, v in out.parts.items()},
              "grads": [n.grad for n in nodes], "world": world}
    path = os.path.join(out_dir, f"rank{rank}.pt")
    torch.save(result, path + ".tmp")
    os.replace(path + ".tmp", path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
