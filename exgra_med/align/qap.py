"""Batched solver for the partial quadratic assignment problem (graph matching) of the alignment loss.

Per batch item: minimise ``sum_ij c_ij x_ij + sum_ab q_ab x[s_a, s'_b] x[t_a, t'_b]`` over PARTIAL
matchings x (0/1, rows and columns sum to at most 1, an unmatched node costs 0), for edges
``a = (s_a, t_a)`` of graph 1 and ``b = (s'_b, t'_b)`` of graph 2: the problem LPMP's graph-matching
solver answers in the reference implementation.

Backends:
- ``"ipfp"`` (default): integer projected fixed point, i.e. Frank-Wolfe with exact line search, from a
  few starts (unary-only assignment, uniform point, seeded random matchings), then a best-improvement
  local search (moves and swaps of one or two rows, dropping rows). The linear step is a partial
  assignment, solved exactly as scipy's assignment on ``min(gradient, 0)`` (non-negative pairs dropped).
  Every problem and start runs in one batch; only the assignment calls leave the device. ``pairs`` picks how
  the quadratic costs are held (``exgra_med.align.pairs``): per edge pair ("sparse", the default) or as the
  earlier dense table ("dense"); the two run the same iterations.
- ``"exhaustive"``: enumerates every partial matching (n <= 8); the reference answer in tests.
- ``"lpmp"``: LPMP's dual-decomposition solver through the optional ``lpmp_py`` package.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from exgra_med.align.pairs import PAIR_TABLES, DensePairTable, SparsePairTable

PairTable = DensePairTable | SparsePairTable

__all__ = ["BACKENDS", "PAIR_ARRANGEMENTS", "paid_edge_pairs", "qap_objective", "solve_partial_qap"]

BACKENDS = ("ipfp", "exhaustive", "lpmp")
PAIR_ARRANGEMENTS = tuple(PAIR_TABLES)  # ipfp's quadratic-cost arrangements (`exgra_med.align.pairs`)
_LPMP_PARAMS = {"maxIter": 100, "primalComputationInterval": 10, "timeout": 1000}
_EXHAUSTIVE_MAX_N = 8
# On an accelerator the local search reads its convergence flag on the host only every few rounds.
_DEVICE_CHECK_EVERY = 8


def _check(unary: torch.Tensor, quadratic: torch.Tensor, edges1: torch.Tensor, edges2: torch.Tensor) -> None:
    if unary.dim() != 3 or quadratic.dim() != 3 or quadratic.shape[0] != unary.shape[0]:
        raise ValueError(f"unary must be (B, n1, n2) and quadratic (B, E1, E2); got {tuple(unary.shape)}, "
                         f"{tuple(quadratic.shape)}")
    for name, e, ne, n in (("edges1", edges1, quadratic.shape[1], unary.shape[1]),
                           ("edges2", edges2, quadratic.shape[2], unary.shape[2])):
        if e.dim() != 3 or e.shape[0] != unary.shape[0] or e.shape[1] != 2 or e.shape[2] != ne:
            raise ValueError(f"{name} must be (B, 2, E) matching quadratic {tuple(quadratic.shape)}; "
                             f"got {tuple(e.shape)}")
        on_host = e.device.type == "cpu"  # value checks would add host syncs on an accelerator
        if on_host and e.numel() and (int(e.min()) < 0 or int(e.max()) >= n):
            raise ValueError(f"{name} holds node ids outside [0, {n})")
    if edges1.device.type == "cpu" and edges1.numel() and bool((edges1[:, 0] == edges1[:, 1]).any()):
        raise ValueError("edges1 contains self loops; the solver expects loop-free graphs (kNN graphs are)")


def paid_edge_pairs(x: torch.Tensor, edges1: torch.Tensor, edges2: torch.Tensor) -> torch.Tensor:
    """0/1 mask z (B, E1, E2) with z_ab = x[s_a, s'_b] * x[t_a, t'_b]: the quadratic terms a matching pays."""
    bsz, e1n, e2n = x.shape[0], edges1.shape[2], edges2.shape[2]
    lifted = []
    for k in (0, 1):  # sources, then targets
        rows = x.gather(1, edges1[:, k, :, None].expand(bsz, e1n, x.shape[2]))  # (B, E1, n2)
        lifted.append(rows.gather(2, edges2[:, k, None, :].expand(bsz, e1n, e2n)))  # (B, E1, E2)
    return lifted[0] * lifted[1]


def qap_objective(x: torch.Tensor, unary: torch.Tensor, quadratic: torch.Tensor, edges1: torch.Tensor,
                  edges2: torch.Tensor) -> torch.Tensor:
    """Objective value (B,) of matchings (or relaxed points) x (B, n1, n2)."""
    return (unary * x).sum((1, 2)) + (quadratic * paid_edge_pairs(x, edges1, edges2)).sum((1, 2))


def _assign(cost: np.ndarray) -> np.ndarray:
    """Min-cost partial matchings of (N, n1, n2) costs as maps (N, n1): column of each row, n2 if unmatched."""
    n2 = cost.shape[2]
    maps = np.full(cost.shape[:2], n2, dtype=np.int64)
    for i, c in enumerate(np.minimum(cost, 0.0)):
        rows, cols = linear_sum_assignment(c)
        keep = c[rows, cols] < 0
        maps[i, rows[keep]] = cols[keep]
    return maps


@functools.lru_cache(maxsize=32)
def _random_starts(shape: tuple[int, int, int], seed: int, count: int) -> tuple[np.ndarray, ...]:
    """The seeded random starting matchings (count arrays (P, n1)): they depend on the shape and seed only, so
    every solve of a training run reuses them instead of solving the same random assignments again."""
    gen = torch.Generator().manual_seed(seed)
    starts = tuple(_assign(-torch.rand(shape, generator=gen).numpy()) for _ in range(count))
    for maps in starts:
        maps.flags.writeable = False
    return starts


def _to_device(array: np.ndarray, dev: torch.device) -> torch.Tensor:
    """Host array -> tensor on dev; to a CUDA device through pinned memory, without blocking the host."""
    tensor = torch.from_numpy(array)
    if dev.type != "cuda":
        return tensor.to(dev)
    return tensor.pin_memory().to(dev, non_blocking=True)


def _one_hot(maps: torch.Tensor, n2: int) -> torch.Tensor:
    out = torch.zeros(*maps.shape, n2 + 1, device=maps.device)
    return out.scatter_(2, maps[:, :, None], 1.0)[:, :, :n2]


def _frank_wolfe(c: torch.Tensor, tab: PairTable, prob: torch.Tensor, x: torch.Tensor, gq: torch.Tensor,
                 max_iter: int, tol: float, patience: int) -> tuple[torch.Tensor, torch.Tensor]:
    """IPFP from points x (N, n1, n2) with gq = (K + K^T) x; returns the best vertices visited (maps, value).

    The quadratic form is linear in x, so gq follows x along each step from the vertices' own gq.
    """
    num, n1, n2 = x.shape
    dev = x.device
    best_maps = torch.full((num, n1), n2, device=dev, dtype=torch.long)
    best_f = torch.full((num,), torch.inf, device=dev)
    active = torch.ones(num, dtype=torch.bool, device=dev)
    stall = torch.zeros(num, dtype=torch.long, device=dev)
    for _ in range(max_iter):
        grad = c + gq
        # The one host transfer of this step: the gradient and the active flags travel together.
        packed = torch.cat([grad.flatten(1), active[:, None].to(grad.dtype)], 1).cpu().numpy()
        host_active = packed[:, -1] > 0
        if not host_active.any():
            break
        maps_host = np.full((num, n1), n2, dtype=np.int64)
        maps_host[host_active] = _assign(packed[host_active, :-1].reshape(-1, n1, n2))
        maps = _to_device(maps_host, dev)
        y = _one_hot(maps, n2)
        if isinstance(tab, SparsePairTable) and not host_active.all():
            # A stopped start's step is the empty matching, whose gradient is zero: compute the others' only.
            live = _to_device(np.flatnonzero(host_active), dev)
            gqy = torch.zeros(num, n1, n2 + 1, device=dev, dtype=x.dtype)
            gqy[live] = tab.gradient(maps[live], prob[live])
            gqy = gqy[:, :, :n2]
        else:
            gqy = tab.gradient(maps, prob)[:, :, :n2]
        half_yky = 0.5 * (y * gqy).sum((1, 2))  # y^T K y
        f_y = (c * y).sum((1, 2)) + half_yky
        better = active & (f_y < best_f)
        best_f = torch.where(better, f_y, best_f)
        best_maps = torch.where(better[:, None], maps, best_maps)
        y_minus_x = y - x
        slope = (grad * y_minus_x).sum((1, 2))
        curv = half_yky - (x * gqy).sum((1, 2)) + 0.5 * (x * gq).sum((1, 2))  # (y - x)^T K (y - x)
        step = torch.where(curv > 0, (-slope / (2 * curv).clamp_min(1e-12)).clamp(0.0, 1.0),
                           (slope + curv < 0).to(x.dtype))
        # FW zigzags slowly near a face and late vertices rarely win: also stop after `patience` idle steps.
        stall = torch.where(better, torch.zeros_like(stall), stall + 1)
        active = active & (slope < -tol) & (stall < patience)
        step = torch.where(active, step, torch.zeros_like(step))[:, None, None]
        x, gq = x + step * y_minus_x, gq + step * (gqy - gq)
    return best_maps, best_f


def _local_search_dense(c: torch.Tensor, tab: PairTable, prob: torch.Tensor, maps: torch.Tensor,
                        max_rounds: int, check_every: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-improvement descent from maps (N, n1); returns (maps, objective values).

    Convergence is read on the host every `check_every` rounds (a host sync on an accelerator); a round
    after convergence changes nothing, so the result does not depend on `check_every`.

    Move (i, j, mode): row i takes column j (or j = n2, unmatched); the row r holding j takes i's old
    column (mode 0) or becomes unmatched (mode 1). Moves are scored exactly from the per-row costs with
    the other rows fixed plus a correction for graph-1 edges between i and r: O(n^2) per round.
    """
    num, n1 = maps.shape
    n2, dev = c.shape[2], c.device
    m = n2 + 1
    c_ext = torch.cat([c, torch.zeros(num, n1, 1, device=dev, dtype=c.dtype)], 2)
    rows, cols, bidx = (torch.arange(k, device=dev) for k in (n1, m, num))
    value = c_ext.gather(2, maps[:, :, None]).sum((1, 2)) + tab.quadratic_value(maps, prob)
    shape = (num, 2, n1, m)  # (problem, mode, row i, column j)
    i, j = rows[None, None, :, None].expand(shape), cols[None, None, None, :].expand(shape)
    mode0 = (torch.arange(2, device=dev) == 0)[None, :, None, None].expand(shape)
    i1 = i[:, :1]
    for rnd in range(max_rounds):
        lin = (c_ext + tab.gradient(maps, prob)).view(num, -1)  # cost of row i at column u, others fixed
        owner = torch.full((num, m), n1, device=dev, dtype=torch.long).scatter_(1, maps, rows.expand(num, -1))
        owner[:, n2] = n1
        old_i = maps[:, None, :, None].expand(shape)
        r = owner[:, None, None, :].expand(shape)
        noop, valid_r = r == i, (r < n1) & (r != i)
        r = torch.where(valid_r, r, torch.zeros_like(r))
        new_r = torch.where(mode0, old_i, torch.full_like(old_i, n2))

        def at(row: torch.Tensor, col: torch.Tensor, lin: torch.Tensor = lin) -> torch.Tensor:
            return lin.gather(1, (row * m + col).flatten(1)).view(shape)

        # Graph-1 edges between i and r: exact change minus what the per-row costs already counted.
        ir, ri = tab.edge_row(prob, i1, r[:, :1]), tab.edge_row(prob, r[:, :1], i1)
        j1, o1, q = j[:, :1], old_i[:, :1], tab.at_row
        corr = (q(ir, j1, new_r) - q(ir, o1, new_r) + q(ri, new_r, j1) - q(ri, new_r, o1)
                + (q(ir, o1, j1) - q(ir, j1, j1) + q(ri, j1, o1) - q(ri, j1, j1)))
        delta = at(i, j) - at(i, old_i)
        delta = delta + torch.where(valid_r, at(r, new_r) - at(r, j) + corr, torch.zeros_like(delta))
        delta = torch.where(noop, torch.full_like(delta, torch.inf), delta).flatten(1)
        best_delta, move = delta.min(1)
        improve = best_delta < -1e-6
        if (rnd + 1) % check_every == 0 and not bool(improve.any()):
            break
        chosen = [t.flatten(1)[bidx, move] for t in (i, j, r, valid_r, new_r)]
        upd = maps.clone()
        upd[bidx, chosen[2]] = torch.where(chosen[3], chosen[4], upd[bidx, chosen[2]])
        upd[bidx, chosen[0]] = chosen[1]
        maps = torch.where(improve[:, None], upd, maps)
        value = torch.where(improve, value + best_delta, value)
    return maps, value


def _take_rows(handle: torch.Tensor | tuple[torch.Tensor, ...],
               keep: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Rows keep of an edge handle from `edge_row` (a tensor, or a tuple of tensors for the sparse table)."""
    return tuple(t[keep] for t in handle) if isinstance(handle, tuple) else handle[keep]


def _local_search_sparse(c: torch.Tensor, tab: PairTable, prob: torch.Tensor, maps: torch.Tensor,
                         max_rounds: int, check_every: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """`_local_search_dense` with the same moves, scores and choices, computed with less work.

    The edge correction is nonzero only where row r holding column j is a graph-1 neighbour of row i, so it
    is evaluated at those (i, r) pairs only (2 E1 per problem and mode, not n1 m) and written into a zero
    tensor; the per-row costs are read by broadcasting instead of gathers. Every score is the same float
    expression of the same values as in `_local_search_dense`. A start that did not improve in a round never
    changes again, so when convergence is read every round (the host) it leaves the batch. Maps and values
    are those of `_local_search_dense`.
    """
    num, n1 = maps.shape
    n2, dev = c.shape[2], c.device
    m = n2 + 1
    c_ext = torch.cat([c, torch.zeros(num, n1, 1, device=dev, dtype=c.dtype)], 2)
    rows, cols = torch.arange(n1, device=dev), torch.arange(m, device=dev)
    value = c_ext.gather(2, maps[:, :, None]).sum((1, 2)) + tab.quadratic_value(maps, prob)
    out_maps, out_value = maps.clone(), value.clone()
    # Ordered graph-1 neighbour pairs (i, r), both directions: (N, 2 E1), and their edges' handles (N, 1, 2 E1).
    pair_i = torch.cat([tab.src, tab.dst], 1)[prob]
    pair_r = torch.cat([tab.dst, tab.src], 1)[prob]
    ir, ri = tab.edge_row(prob, pair_i[:, None], pair_r[:, None]), tab.edge_row(prob, pair_r[:, None], pair_i[:, None])
    work = torch.arange(num, device=dev)  # the starts still descending
    i_col = rows[None, None, :, None]
    for rnd in range(max_rounds):
        num = work.shape[0]
        lin = (c_ext + tab.gradient(maps, prob)).view(num, n1, m)  # cost of row i at column u, others fixed
        owner = torch.full((num, m), n1, device=dev, dtype=torch.long).scatter_(1, maps, rows.expand(num, -1))
        owner[:, n2] = n1
        r = owner[:, None, None, :]  # (N, 1, 1, m): the row holding column j
        noop_i, valid_r = r == i_col, (r < n1) & (r != i_col)  # (N, 1, n1, m)
        r_safe = torch.where(r < n1, r, torch.zeros_like(r)).view(num, 1, m)
        old = maps[:, :, None]  # (N, n1, 1)
        # Per-row costs: at(i, j), at(i, old_i), at(r, j), at(r, new_r) with new_r = old_i (mode 0) or n2 (mode 1).
        at_ij, at_io = lin[:, None], lin.gather(2, old)[:, None]
        flat = lin.view(num, n1 * m)
        at_rj = flat.gather(1, r_safe[:, 0] * m + cols)[:, None, None]  # (N, 1, 1, m)
        at_rnew = torch.stack([flat.gather(1, (r_safe * m + old).view(num, -1)).view(num, n1, m),
                               flat.gather(1, r_safe[:, 0] * m + n2)[:, None].expand(num, n1, m)], 1)
        # Edge correction at the neighbour pairs, as `_local_search_dense` writes it.
        o1 = maps.gather(1, pair_i)[:, None]  # (N, 1, 2E1): i's old column
        j1 = maps.gather(1, pair_r)[:, None]  # the column r holds
        new_r = torch.cat([o1, torch.full_like(o1, n2)], 1)  # (N, 2, 2E1)
        q = tab.at_row
        corr_pairs = (q(ir, j1, new_r) - q(ir, o1, new_r) + q(ri, new_r, j1) - q(ri, new_r, o1)
                      + (q(ir, o1, j1) - q(ir, j1, j1) + q(ri, j1, o1) - q(ri, j1, j1)))
        corr = torch.zeros(num, 2, n1 * m, device=dev, dtype=lin.dtype)
        corr.scatter_(2, (pair_i[:, None] * m + j1).expand(num, 2, -1), corr_pairs)
        delta = at_ij - at_io
        delta = delta + torch.where(valid_r, at_rnew - at_rj + corr.view(num, 2, n1, m), torch.zeros_like(delta))
        delta = torch.where(noop_i, torch.full_like(delta, torch.inf), delta).flatten(1)
        best_delta, move = delta.min(1)
        improve = best_delta < -1e-6
        if (rnd + 1) % check_every == 0 and not bool(improve.any()):
            break
        bidx = torch.arange(num, device=dev)
        mode, ci, cj = move // (n1 * m), (move // m) % n1, move % m
        cr = owner[bidx, cj]
        cvalid = (cr < n1) & (cr != ci)
        cr = torch.where(cvalid, cr, torch.zeros_like(cr))
        cnew = torch.where(mode == 0, maps[bidx, ci], torch.full_like(ci, n2))
        upd = maps.clone()
        upd[bidx, cr] = torch.where(cvalid, cnew, upd[bidx, cr])
        upd[bidx, ci] = cj
        maps = torch.where(improve[:, None], upd, maps)
        value = torch.where(improve, value + best_delta, value)
        if check_every == 1 and not bool(improve.all()):  # drop the converged starts (their results are final)
            out_maps[work], out_value[work] = maps, value
            keep = improve.nonzero().squeeze(1)
            work, maps, value, prob, c_ext = work[keep], maps[keep], value[keep], prob[keep], c_ext[keep]
            pair_i, pair_r, ir, ri = pair_i[keep], pair_r[keep], _take_rows(ir, keep), _take_rows(ri, keep)
    out_maps[work], out_value[work] = maps, value
    return out_maps, out_value


def _ipfp(unary: torch.Tensor, quadratic: torch.Tensor, edges1: torch.Tensor, edges2: torch.Tensor,
          num_starts: int, max_iter: int, seed: int, tol: float, local_search_rounds: int,
          patience: int, pairs: str) -> torch.Tensor:
    nprob, n1, n2 = unary.shape
    dev = unary.device
    c = unary.detach().float()
    tab = PAIR_TABLES[pairs](quadratic.detach().float(), edges1.to(dev), edges2.to(dev), n1, n2)
    # Starts: unary-only assignment, (if num_starts > 1) the uniform point, then seeded random matchings.
    start_maps = [_assign(c.cpu().numpy()), *_random_starts(tuple(c.shape), seed, num_starts - 2)]
    maps0 = _to_device(np.concatenate(start_maps), dev)  # (S_d * P, n1), start-major
    prob = torch.arange(nprob, device=dev).repeat(len(start_maps))
    x, gq = _one_hot(maps0, n2), tab.gradient(maps0, prob)[:, :, :n2]
    f0 = (c[prob] * x).sum((1, 2)) + 0.5 * (x * gq).sum((1, 2))
    if num_starts > 1:
        scale = 1.0 / max(n1, n2)
        x = torch.cat([x, torch.full_like(c, scale)])
        gq = torch.cat([gq, scale * tab.uniform_gradient()[:, :, :n2]])
        f0 = torch.cat([f0, torch.full((nprob,), torch.inf, device=dev)])
        maps0 = torch.cat([maps0, torch.full((nprob, n1), n2, device=dev, dtype=torch.long)])
        prob = torch.cat([prob, torch.arange(nprob, device=dev)])
    cost = c[prob]
    maps, value = _frank_wolfe(cost, tab, prob, x, gq, max_iter, tol, patience)
    keep_start = f0 <= value
    maps, value = torch.where(keep_start[:, None], maps0, maps), torch.where(keep_start, f0, value)
    if local_search_rounds > 0:
        check_every = 1 if dev.type == "cpu" else _DEVICE_CHECK_EVERY
        local_search = _local_search_sparse if pairs == "sparse" else _local_search_dense
        maps, value = local_search(cost, tab, prob, maps, local_search_rounds, check_every)
    best = value.view(-1, nprob).argmin(0)  # (P,)
    return _one_hot(maps.view(-1, nprob, n1)[best, torch.arange(nprob, device=dev)], n2)

def _enumerate_partial_matchings(n1: int, n2: int) -> np.ndarray:
    """All partial matchings as an (M, n1) int array: entry i is row i's column, or n2 when unmatched."""
    maps, used = np.zeros((1, 0), dtype=np.int64), np.zeros((1, n2), dtype=bool)
    for _ in range(n1):
        parts_m, parts_u = [np.concatenate([maps, np.full((len(maps), 1), n2)], 1)], [used]
        for v in range(n2):
            sel = ~used[:, v]
            parts_m.append(np.concatenate([maps[sel], np.full((int(sel.sum()), 1), v)], 1))
            parts_u.append(used[sel].copy())
            parts_u[-1][:, v] = True
        maps, used = np.concatenate(parts_m), np.concatenate(parts_u)
    return maps


def _exhaustive(unary: torch.Tensor, quadratic: torch.Tensor, edges1: torch.Tensor, edges2: torch.Tensor,
                chunk: int = 1 << 16) -> torch.Tensor:
    nprob, n1, n2 = unary.shape
    if max(n1, n2) > _EXHAUSTIVE_MAX_N:
        raise ValueError(f"backend='exhaustive' enumerates every partial matching; n <= {_EXHAUSTIVE_MAX_N} "
                         f"only, got {n1} x {n2}")
    c = torch.cat([unary.detach().double().cpu(), torch.zeros(nprob, n1, 1, dtype=torch.float64)], 2)
    tab = DensePairTable(quadratic.detach().double().cpu(), edges1.cpu(), edges2.cpu(), n1, n2)
    all_maps = torch.from_numpy(_enumerate_partial_matchings(n1, n2))  # (M, n1)
    best = torch.zeros(nprob, n1, dtype=torch.long)
    for p in range(nprob):
        best_val = torch.inf
        for lo in range(0, len(all_maps), chunk):
            maps = all_maps[lo:lo + chunk]
            val = c[p].gather(1, maps.T).sum(0) + tab.quadratic_value(maps, torch.full((len(maps),), p))
            k = int(val.argmin())
            if float(val[k]) < best_val:
                best_val, best[p] = float(val[k]), maps[k]
    return _one_hot(best, n2)


def _lpmp(unary: torch.Tensor, quadratic: torch.Tensor, edges1: torch.Tensor,
          edges2: torch.Tensor) -> torch.Tensor:
    try:
        # lazy: lpmp_py is an optional solver, not a dependency
        from lpmp_py.raw_solvers import gm_solver
    except ImportError as err:
        raise ImportError("backend='lpmp' needs the optional package `lpmp_py` (LPMP's Python bindings, "
                          "github.com/LPMP/LPMP); install it or use backend='ipfp'") from err
    out = np.zeros(unary.shape, dtype=np.float32)
    for b in range(unary.shape[0]):
        out[b], _ = gm_solver(costs=unary[b].detach().double().cpu().numpy(),
                              quadratic_costs=quadratic[b].detach().double().cpu().numpy(),
                              edges_left=edges1[b].T.cpu().numpy(), edges_right=edges2[b].T.cpu().numpy(),
                              solver_params=_LPMP_PARAMS)
    return torch.from_numpy(out)


def solve_partial_qap(unary: torch.Tensor, quadratic: torch.Tensor, edges1: torch.Tensor,
                      edges2: torch.Tensor, backend: str = "ipfp", num_starts: int = 4, max_iter: int = 30,
                      seed: int = 0, tol: float = 1e-6, local_search_rounds: int = 50,
                      patience: int = 3, solve_on: str | None = None, pairs: str = "sparse") -> torch.Tensor:
    """Solve B partial graph-matching problems at once; returns 0/1 matchings (B, n1, n2).

    unary (B, n1, n2), quadratic (B, E1, E2), edges1 (B, 2, E1), edges2 (B, 2, E2) long (row 0 sources,
    row 1 targets; edges1 loop-free). The result has unary's dtype and device. The other arguments tune
    ipfp: starts, Frank-Wolfe steps, seed of the random starts, descent tolerance, local-search rounds,
    and Frank-Wolfe steps without a better vertex before a start stops. `solve_on` ("cpu", "cuda", ...) runs
    the solver on another device than the inputs' (one transfer each way; None: the inputs' device). `pairs`
    arranges ipfp's quadratic costs (`exgra_med.align.pairs`): "sparse" (per edge pair, work linear in the
    edges) or "dense" (the earlier (E1, m, m) table per problem, cubic in n); same iterates up to the order of
    float32 additions within a gradient entry.
    """
    edges1, edges2 = edges1.long(), edges2.long()
    _check(unary, quadratic, edges1, edges2)
    if unary.numel() == 0:
        return torch.zeros_like(unary)
    target = torch.device(solve_on) if solve_on is not None else unary.device
    if target.type != unary.device.type or target.index not in (None, unary.device.index):
        x = solve_partial_qap(unary.detach().to(target), quadratic.detach().to(target), edges1.to(target),
                              edges2.to(target), backend, num_starts, max_iter, seed, tol, local_search_rounds,
                              patience, pairs=pairs)
        return x.to(dtype=unary.dtype, device=unary.device)
    with torch.no_grad():
        if backend == "ipfp":
            if num_starts < 1 or max_iter < 1 or patience < 1 or local_search_rounds < 0:
                raise ValueError("num_starts, max_iter, patience must be >= 1 and local_search_rounds >= 0; "
                                 f"got {num_starts}, {max_iter}, {patience}, {local_search_rounds}")
            if pairs not in PAIR_TABLES:
                raise ValueError(f"unknown pair-cost arrangement pairs={pairs!r}; choose one of {PAIR_ARRANGEMENTS}")
            x = _ipfp(unary, quadratic, edges1, edges2, num_starts, max_iter, seed, tol, local_search_rounds,
                      patience, pairs)
        elif backend == "exhaustive":
            x = _exhaustive(unary, quadratic, edges1, edges2)
        elif backend == "lpmp":
            x = _lpmp(unary, quadratic, edges1, edges2)
        else:
            raise ValueError(f"unknown QAP backend {backend!r}; choose one of {BACKENDS}")
    return x.to(dtype=unary.dtype, device=unary.device)
