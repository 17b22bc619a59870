"""Speed and solution quality of the ExGra-Med alignment loss and its partial-QAP solver.

Speed: one full MultiGraphAlignmentLoss forward + backward (training mode, D = 256) at B = 16, 32, 64,
median of repeats, with torch's thread count pinned. Quality: on the six problems a step builds from
random nodes, the objective reached by our solver, by pygmtools' IPFP and RRWM (run on the problem padded
with n dummy nodes per side, which turns partial matching into a permutation problem; RRWM's affinities
are shifted by a constant to be non-negative, which leaves the ranking of permutations unchanged) and, for
n <= 8, by exhaustive enumeration. Run: ``python benchmarks/bench_align.py [--quick] [--threads N]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch

from exgra_med.align import MultiGraphAlignmentLoss, qap_objective, solve_partial_qap

DIM = 256


def _nodes(bsz: int, dim: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(bsz, dim, generator=gen)
    return [(base + torch.randn(bsz, dim, generator=gen)).requires_grad_(True) for _ in range(3)]


def time_step(bsz: int, repeats: int, dim: int = DIM) -> dict:
    """Median wall time (ms) of one alignment forward + backward at batch size bsz."""
    torch.manual_seed(0)
    module = MultiGraphAlignmentLoss(dim, seed=0).train()
    times, losses = [], []
    for rep in range(repeats + 1):  # the first run warms up
        nodes = _nodes(bsz, dim, rep)
        start = time.perf_counter()
        out = module(*nodes)
        out.loss.backward()
        if rep:
            times.append((time.perf_counter() - start) * 1000)
            losses.append(float(out.loss.detach()))
    return {"kind": "speed", "B": bsz, "D": dim, "ms_median": statistics.median(times),
            "ms_min": min(times), "hamming": statistics.mean(losses), "repeats": repeats}


def _affinity(unary: torch.Tensor, quadratic: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """pygmtools affinity (maximised, column-wise vec) of the problem padded to 2n x 2n: (P, 4n^2, 4n^2)."""
    prob, n, _ = unary.shape
    size = 2 * n
    aff = torch.zeros(prob, size * size, size * size, dtype=torch.float64)

    def idx(i: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return a * size + i

    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    diag = idx(rows.flatten(), cols.flatten())
    for p in range(prob):
        aff[p, diag, diag] = -unary[p].flatten().double()
        src = idx(edges[p, 0][:, None], edges[p, 0][None, :]).flatten()
        dst = idx(edges[p, 1][:, None], edges[p, 1][None, :]).flatten()
        aff[p].index_put_((src, dst), -quadratic[p].flatten().double(), accumulate=True)
    return (aff + aff.transpose(1, 2)) / 2  # same quadratic form; pygmtools expects a symmetric K


def _pygm_solutions(unary: torch.Tensor, quadratic: torch.Tensor, edges: torch.Tensor) -> dict:
    import pygmtools as pygm

    pygm.set_backend("pytorch")
    prob, n, _ = unary.shape
    aff = _affinity(unary, quadratic, edges)
    sizes = torch.full((prob,), 2 * n)
    out = {"pygm_ipfp": pygm.ipfp(aff, sizes, sizes)}
    # Adding a constant to every entry adds const * (2n)^2 to every permutation's score: same optimum,
    # and RRWM's random walk needs non-negative affinities.
    shifted = aff - aff.flatten(1).amin(1)[:, None, None]
    out["pygm_rrwm"] = pygm.hungarian(pygm.rrwm(shifted, sizes, sizes), sizes, sizes)
    return {k: v[:, :n, :n].to(unary.dtype) for k, v in out.items()}


def quality(n: int, seeds: int, dim: int = 64) -> list[dict]:
    """Objectives of each method on 6 * seeds loss problems with n nodes; rows per method."""
    values: dict[str, list[torch.Tensor]] = {}
    timings: dict[str, float] = {}
    for seed in range(seeds):
        torch.manual_seed(seed)
        module = MultiGraphAlignmentLoss(dim, seed=seed).train()
        with torch.no_grad():
            unary, quadratic, edges = module.build_problems(*_nodes(n, dim, seed))
        sols = {}
        start = time.perf_counter()
        sols["ours_ipfp"] = solve_partial_qap(unary, quadratic, edges, edges)
        timings["ours_ipfp"] = timings.get("ours_ipfp", 0.0) + time.perf_counter() - start
        start = time.perf_counter()
        sols.update(_pygm_solutions(unary, quadratic, edges))
        timings["pygm"] = timings.get("pygm", 0.0) + time.perf_counter() - start
        if n <= 8:
            sols["exhaustive"] = solve_partial_qap(unary, quadratic, edges, edges, backend="exhaustive")
        for name, x in sols.items():
            values.setdefault(name, []).append(qap_objective(x, unary, quadratic, edges, edges))
    stacked = {k: torch.cat(v) for k, v in values.items()}
    best = torch.stack(list(stacked.values())).amin(0)
    rows = []
    for name, val in stacked.items():
        gap = (val - best) / best.abs().clamp_min(1e-9)
        rows.append({"kind": "quality", "n": n, "method": name, "problems": len(val),
                     "best_rate": float((val <= best + 1e-5).float().mean()),
                     "mean_rel_gap": float(gap.mean()), "mean_objective": float(val.mean())})
    rows.append({"kind": "quality_time", "n": n, "ours_ms_per_6": 1000 * timings["ours_ipfp"] / seeds,
                 "pygm_ms_per_6": 1000 * timings["pygm"] / seeds})
    return rows


def run(quick: bool = False, threads: int = 1) -> list[dict]:
    """All measurements as rows of dicts; quick = one batch size, few repeats, small quality study."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = [time_step(b, repeats=3 if quick else 9) | {"threads": threads}
                for b in ((16,) if quick else (16, 32, 64))]
        for n, seeds in (((8, 2),) if quick else ((8, 6), (16, 3))):
            rows += quality(n, seeds)
    finally:
        torch.set_num_threads(previous)
    return rows


def _table(rows: list[dict]) -> str:
    lines = ["| B | D | threads | median ms | min ms | mean Hamming |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['B']} | {r['D']} | {r['threads']} | {r['ms_median']:.1f} | {r['ms_min']:.1f} | "
              f"{r['hamming']:.3f} |" for r in rows if r["kind"] == "speed"]
    lines += ["", "| n | method | problems | reaches best | mean relative gap |", "|---|---|---|---|---|"]
    lines += [f"| {r['n']} | {r['method']} | {r['problems']} | {100 * r['best_rate']:.0f}% | "
              f"{100 * r['mean_rel_gap']:.2f}% |" for r in rows if r["kind"] == "quality"]
    lines += ["", "| n | ours ms / 6 problems | pygmtools ms (IPFP + RRWM) |", "|---|---|---|"]
    lines += [f"| {r['n']} | {r['ours_ms_per_6']:.1f} | {r['pygm_ms_per_6']:.1f} |"
              for r in rows if r["kind"] == "quality_time"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the benchmark tables as markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one batch size, few repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads value")
    args = parser.parse_args(argv)
    print(_table(run(quick=args.quick, threads=args.threads)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
