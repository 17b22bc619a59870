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
  Every problem and start runs in one batch; only the assignment calls leave the device.
- ``"exhaustive"``: enumerates every partial matching (n <= 8); the reference answer in tests.
- ``"lpmp"``: LPMP's dual-decomposition solver through the optional ``lpmp_py`` package.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["BACKENDS", "paid_edge_pairs", "qap_objective", "solve_partial_qap"]

BACKENDS = ("ipfp", "exhaustive", "lpmp")
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


class _PairTable:
    """Quadratic costs regrouped per graph-1 edge: table[p, a, u, v] = sum of q_ab over b = (u, v).

    Index n2 stands for "unmatched" (zero cost). Parallel graph-1 edges are merged into their first copy
    (the other copies' rows stay zero), so ``eid`` can map a node pair (s, t) to one row; row E1 is zero.
    """

    def __init__(self, quadratic: torch.Tensor, edges1: torch.Tensor, edges2: torch.Tensor, n1: int,
                 n2: int) -> None:
        prob, e1n, e2n = quadratic.shape
        dev, self.m, self.n1, self.e1n = quadratic.device, n2 + 1, n1, e1n
        m = self.m
        self.src, self.dst = edges1[:, 0], edges1[:, 1]  # (P, E1)
        key = self.src * n1 + self.dst
        first = (key[:, :, None] == key[:, None, :]).int().argmax(2)  # first edge with the same pair
        per_edge = torch.zeros(prob, e1n, m * m, device=dev, dtype=quadratic.dtype)
        per_edge.scatter_add_(2, (edges2[:, 0] * m + edges2[:, 1])[:, None, :].expand(prob, e1n, e2n), quadratic)
        table = torch.zeros(prob, e1n + 1, m * m, device=dev, dtype=quadratic.dtype)
        table.scatter_add_(1, first[:, :, None].expand(-1, -1, m * m), per_edge)
        self.flat = table.view(prob, -1)
        self.table = table.view(prob, e1n + 1, m, m)
        self.eid = torch.full((prob, n1 * n1), e1n, device=dev, dtype=torch.long).scatter_(1, key, first)
        self._bound: tuple[torch.Tensor, ...] | None = None

    def _bind(self, prob: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Per-instance views for problems prob (N,), memoised for the prob tensor of the current solve.
        if self._bound is None or self._bound[0] is not prob:
            src, dst = self.src[prob], self.dst[prob]  # (N, E1)
            eye = torch.eye(self.n1, device=prob.device, dtype=self.flat.dtype)
            inc_s, inc_t = eye[src].transpose(1, 2), eye[dst].transpose(1, 2)  # (N, n1, E1) incidences
            base = (prob[:, None] * (self.e1n + 1) + torch.arange(self.e1n, device=prob.device)) * self.m
            self._bound = (prob, src, dst, inc_s, inc_t, base * self.m)  # base: flat offset of (p, a)
        return self._bound[1:]

    def gradient(self, maps: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
        """(K + K^T) y for matchings given as maps (N, n1) of problems prob (N,): (N, n1, m)."""
        src, dst, inc_s, inc_t, base = self._bind(prob)
        ps, pt = maps.gather(1, src)[:, :, None], maps.gather(1, dst)[:, :, None]  # (N, E1, 1)
        cols = torch.arange(self.m, device=maps.device)
        row_s = torch.take(self.flat, base[:, :, None] + cols * self.m + pt)  # Q(a, u, p[t_a]) (N, E1, m)
        row_t = torch.take(self.flat, base[:, :, None] + ps * self.m + cols)  # Q(a, p[s_a], u)
        return inc_s @ row_s + inc_t @ row_t

    def uniform_gradient(self) -> torch.Tensor:
        """(K + K^T) applied to the all-ones matrix: (P, n1, m)."""
        prob, dev = self.src.shape[0], self.flat.device
        by_s, by_t = self.table[:, :-1].sum(3), self.table[:, :-1].sum(2)  # (P, E1, m)
        out = torch.zeros(prob, self.n1, self.m, device=dev, dtype=self.flat.dtype)
        out.scatter_add_(1, self.src[:, :, None].expand_as(by_s), by_s)
        return out.scatter_add_(1, self.dst[:, :, None].expand_as(by_t), by_t)

    def quadratic_value(self, maps: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
        """Quadratic part of the objective of maps (N, n1): (N,)."""
        src, dst = self.src[prob], self.dst[prob]
        a = torch.arange(self.e1n, device=maps.device)[None, :]
        return self.table[prob[:, None], a, maps.gather(1, src), maps.gather(1, dst)].sum(1)

    def edge_row(self, prob: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Flat offset of the table block of graph-1 edge (s, t) (the zero row if absent); (N, ...) indices."""
        p = prob.view(-1, *([1] * (s.dim() - 1)))
        a = torch.take(self.eid, p * self.n1 * self.n1 + s * self.n1 + t)
        return (p * (self.e1n + 1) + a) * self.m

    def at_row(self, row: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """table[row][u, v] for offsets from edge_row (broadcast)."""
        return torch.take(self.flat, (row + u) * self.m + v)


def _to_device(array: np.ndarray, dev: torch.device) -> torch.Tensor:
    """Host array -> tensor on dev; to a CUDA device through pinned memory, without blocking the host."""
    tensor = torch.from_numpy(array)
    if dev.type != "cuda":
        return tensor.to(dev)
    return tensor.pin_memory().to(dev, non_blocking=True)


def _one_hot(maps: torch.Tensor, n2: int) -> torch.Tensor:
    out = torch.zeros(*maps.shape, n2 + 1, device=maps.device)
    return out.scatter_(2, maps[:, :, None], 1.0)[:, :, :n2]


def _frank_wolfe(c: torch.Tensor, tab: _PairTable, prob: torch.Tensor, x: torch.Tensor, gq: torch.Tensor,
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
        gqy = tab.gradient(maps, prob)[:, :, :n2]
        half_yky = 0.5 * (y * gqy).sum((1, 2))  # y^T K y
        f_y = (c * y).sum((1, 2)) + half_yky
        better = active & (f_y < best_f)
        best_f = torch.where(better, f_y, best_f)
        best_maps = torch.where(better[:, None], maps, best_maps)
        slope = (grad * (y - x)).sum((1, 2))
        curv = half_yky - (x * gqy).sum((1, 2)) + 0.5 * (x * gq).sum((1, 2))  # (y - x)^T K (y - x)
        step = torch.where(curv > 0, (-slope / (2 * curv).clamp_min(1e-12)).clamp(0.0, 1.0),
                           (slope + curv < 0).to(x.dtype))
        # FW zigzags slowly near a face and late vertices rarely win: also stop after `patience` idle steps.
        stall = torch.where(better, torch.zeros_like(stall), stall + 1)
        active = active & (slope < -tol) & (stall < patience)
        step = torch.where(active, step, torch.zeros_like(step))[:, None, None]
        x, gq = x + step * (y - x), gq + step * (gqy - gq)
    return best_maps, best_f


def _local_search(c: torch.Tensor, tab: _PairTable, prob: torch.Tensor, maps: torch.Tensor,
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


def _ipfp(unary: torch.Tensor, quadratic: torch.Tensor, edges1: torch.Tensor, edges2: torch.Tensor,
          num_starts: int, max_iter: int, seed: int, tol: float, local_search_rounds: int,
          patience: int) -> torch.Tensor:
    nprob, n1, n2 = unary.shape
    dev = unary.device
    c = unary.detach().float()
    tab = _PairTable(quadratic.detach().float(), edges1.to(dev), edges2.to(dev), n1, n2)
    # Starts: unary-only assignment, (if num_starts > 1) the uniform point, then seeded random matchings.
    gen = torch.Generator().manual_seed(seed)
    start_maps = [_assign(c.cpu().numpy())]
    start_maps += [_assign(-torch.rand(c.shape, generator=gen).numpy()) for _ in range(num_starts - 2)]
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
        maps, value = _local_search(cost, tab, prob, maps, local_search_rounds, check_every)
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
    tab = _PairTable(quadratic.detach().double().cpu(), edges1.cpu(), edges2.cpu(), n1, n2)
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
                      patience: int = 3, solve_on: str | None = None) -> torch.Tensor:
    """Solve B partial graph-matching problems at once; returns 0/1 matchings (B, n1, n2).

    unary (B, n1, n2), quadratic (B, E1, E2), edges1 (B, 2, E1), edges2 (B, 2, E2) long (row 0 sources,
    row 1 targets; edges1 loop-free). The result has unary's dtype and device. The other arguments tune
    ipfp: starts, Frank-Wolfe steps, seed of the random starts, descent tolerance, local-search rounds,
    and Frank-Wolfe steps without a better vertex before a start stops. `solve_on` ("cpu", "cuda", ...) runs
    the solver on another device than the inputs' (one transfer each way; None: the inputs' device).
    """
    edges1, edges2 = edges1.long(), edges2.long()
    _check(unary, quadratic, edges1, edges2)
    if unary.numel() == 0:
        return torch.zeros_like(unary)
    target = torch.device(solve_on) if solve_on is not None else unary.device
    if target.type != unary.device.type or target.index not in (None, unary.device.index):
        x = solve_partial_qap(unary.detach().to(target), quadratic.detach().to(target), edges1.to(target),
                              edges2.to(target), backend, num_starts, max_iter, seed, tol, local_search_rounds,
                              patience)
        return x.to(dtype=unary.dtype, device=unary.device)
    with torch.no_grad():
        if backend == "ipfp":
            if num_starts < 1 or max_iter < 1 or patience < 1 or local_search_rounds < 0:
                raise ValueError("num_starts, max_iter, patience must be >= 1 and local_search_rounds >= 0; "
                                 f"got {num_starts}, {max_iter}, {patience}, {local_search_rounds}")
            x = _ipfp(unary, quadratic, edges1, edges2, num_starts, max_iter, seed, tol, local_search_rounds,
                      patience)
        elif backend == "exhaustive":
            x = _exhaustive(unary, quadratic, edges1, edges2)
        elif backend == "lpmp":
            x = _lpmp(unary, quadratic, edges1, edges2)
        else:
            raise ValueError(f"unknown QAP backend {backend!r}; choose one of {BACKENDS}")
    return x.to(dtype=unary.dtype, device=unary.device)
