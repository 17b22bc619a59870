"""Speed and solution quality of the ExGra-Med alignment loss and its partial-QAP solver.

Speed: one full MultiGraphAlignmentLoss forward + backward (training mode, D = 256) at B = 16, 32, 64, 128,
median of repeats, with torch's thread count pinned, for both arrangements of the solver's quadratic costs
(``pairs="dense"``, the earlier (E1, m, m) table, and ``pairs="sparse"``, the default) in interleaved rounds on the
same nodes, so that both see the same machine load; wall and CPU (process) time, their ratio, and whether the
losses agree. Quality: on the six problems a step builds from
random nodes, the objective reached by our solver, by pygmtools' IPFP and RRWM (run on the problem padded
with n dummy nodes per side, which turns partial matching into a permutation problem; RRWM's affinities
are shifted by a constant to be non-negative, which leaves the ranking of permutations unchanged) and, for
n <= 8, by exhaustive enumeration. Run: ``python -m benchmarks.bench_align [--quick] [--threads N] [--sizes 16,64]``.
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


ARRANGEMENTS = ("dense", "sparse")  # solver pair costs: the earlier arrangement, then the default


def time_steps(bsz: int, repeats: int, dim: int = DIM, arrangements: Sequence[str] = ARRANGEMENTS) -> list[dict]:
    """Wall and CPU time (ms) of one alignment forward + backward at batch size bsz per solver arrangement.

    One step of each arrangement per round, on the same nodes, from identically seeded modules (the first round
    warms up); rows per arrangement with medians, then a comparison row (median of the per-round ratios against the
    first arrangement, and whether every step's loss agreed).
    """
    modules = {}
    for name in arrangements:
        torch.manual_seed(0)
        modules[name] = MultiGraphAlignmentLoss(dim, seed=0, solver_kwargs={"pairs": name}).train()
    wall: dict[str, list[float]] = {name: [] for name in arrangements}
    cpu: dict[str, list[float]] = {name: [] for name in arrangements}
    losses: dict[str, list[float]] = {name: [] for name in arrangements}
    for rep in range(repeats + 1):
        nodes = _nodes(bsz, dim, rep)
        for name, module in modules.items():
            inputs = [t.detach().clone().requires_grad_(True) for t in nodes]
            start, start_cpu = time.perf_counter(), time.process_time()
            out = module(*inputs)
            out.loss.backward()
            if rep:
                wall[name].append((time.perf_counter() - start) * 1000)
                cpu[name].append((time.process_time() - start_cpu) * 1000)
                losses[name].append(float(out.loss.detach()))
    rows = [{"kind": "speed", "B": bsz, "D": dim, "pairs": name, "ms_median": statistics.median(wall[name]),
             "ms_min": min(wall[name]), "cpu_ms_median": statistics.median(cpu[name]),
             "hamming": statistics.mean(losses[name]), "repeats": repeats} for name in arrangements]
    base = arrangements[0]
    for name in arrangements[1:]:
        rows.append({"kind": "speedup", "B": bsz, "baseline": base, "pairs": name,
                     "wall_ratio": statistics.median(a / b for a, b in zip(wall[base], wall[name])),
                     "cpu_ratio": statistics.median(a / b for a, b in zip(cpu[base], cpu[name])),
                     "same_losses": losses[base] == losses[name]})
    return rows


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


def run(quick: bool = False, threads: int = 1, sizes: Sequence[int] | None = None) -> list[dict]:
    """All measurements as rows of dicts; quick = B = 16 and 64, few repeats, small quality study."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sizes = sizes or ((16, 64) if quick else (16, 32, 64, 128))
        rows = [r | {"threads": threads} for b in sizes for r in time_steps(b, repeats=3 if quick else 9)]
        for n, seeds in (((8, 2),) if quick else ((8, 6), (16, 3))):
            rows += quality(n, seeds)
    finally:
        torch.set_num_threads(previous)
    return rows


def step_ms(rows: list[dict], bsz: int, pairs: str = "sparse") -> float:
    """Median wall ms of the alignment step at batch size bsz with the given solver arrangement (the default)."""
    return next(r["ms_median"] for r in rows if r["kind"] == "speed" and r["B"] == bsz and r["pairs"] == pairs)


def _table(rows: list[dict]) -> str:
    lines = ["| B | D | threads | solver pairs | median ms | min ms | median CPU ms | mean Hamming |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['B']} | {r['D']} | {r['threads']} | {r['pairs']} | {r['ms_median']:.1f} | {r['ms_min']:.1f} | "
              f"{r['cpu_ms_median']:.1f} | {r['hamming']:.3f} |" for r in rows if r["kind"] == "speed"]
    lines += ["", "| B | speed-up, wall (CPU) | same loss every step |", "|---|---|---|"]
    lines += [f"| {r['B']} | {r['pairs']} over {r['baseline']}: {r['wall_ratio']:.1f}x ({r['cpu_ratio']:.1f}x) | "
              f"{r['same_losses']} |" for r in rows if r["kind"] == "speedup"]
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
    parser.add_argument("--sizes", default=None, help="comma-separated batch sizes to time (default 16,32,64,128)")
    args = parser.parse_args(argv)
    sizes = [int(b) for b in args.sizes.split(",")] if args.sizes else None
    print(_table(run(quick=args.quick, threads=args.threads, sizes=sizes)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
