"""Quadratic pair costs of the partial QAP, arranged for the solver's gradient and move evaluations.

``Q(p, a, u, v)``: the summed quadratic cost of graph-1 edge ``a`` of problem ``p`` mapped onto node pair
``(u, v)`` of graph 2, i.e. the sum of ``q_ab`` over graph-2 edges ``b = (u, v)``; index ``n2`` stands for
"unmatched" and costs nothing. Parallel graph-1 edges are merged into their first copy (the other copies
cost zero), so a node pair (s, t) names one graph-1 edge. Two arrangements answer the same queries:

- ``DensePairTable`` (``pairs="dense"``, the earlier arrangement): Q as a dense (P, E1 + 1, m, m) table
  (m = n2 + 1); the gradient reads (E1, m) rows of it and sums them per node with incidence-matrix products.
  O(E1 m^2) memory per problem, O(n1 E1 m) work per gradient: cubic in the batch for kNN graphs.
- ``SparsePairTable`` (``pairs="sparse"``, the default): q itself, (P, E1 + 1, E2 + 1) with parallel graph-2 edges
  merged likewise, and graph 2 as adjacency lists. The gradient visits only the edge pairs that can be nonzero:
  O(E1 * degree) work.

Both store the same values at the same (a, u, v), and their gradients add the same nonzero terms; only the
order in which a gradient entry's few terms (at most the graph degrees) are added differs, so entries can differ
in the last float32 bit. ``quadratic_value`` and the move costs are read, not summed, and agree exactly.
"""

from __future__ import annotations

import torch

__all__ = ["DensePairTable", "SparsePairTable", "PAIR_TABLES"]


def _first_copy(key: torch.Tensor) -> torch.Tensor:
    """For keys (P, E): the index of the first entry with the same key, per problem (P, E).

    A stable sort puts equal keys next to each other in index order, so each run starts at its first copy.
    """
    prob, num_e = key.shape
    if num_e == 0:
        return key.clone()
    order = torch.sort(key, dim=1, stable=True)
    sorted_key, idx = order.values, order.indices
    starts = torch.ones_like(sorted_key, dtype=torch.bool)
    starts[:, 1:] = sorted_key[:, 1:] != sorted_key[:, :-1]
    pos = torch.arange(num_e, device=key.device).expand(prob, num_e)
    run_start = torch.where(starts, pos, torch.zeros_like(pos)).cummax(1).values  # sorted position of the run start
    return torch.empty_like(idx).scatter_(1, idx, idx.gather(1, run_start))


def _read(flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """flat[index] for a 1-D tensor and an index of any shape (index_select: a few times faster than take)."""
    return flat.index_select(0, index.reshape(-1)).view(index.shape)


class DensePairTable:
    """Q as a dense table: table[p, a, u, v]; row E1 is zero. See the module docstring."""

    def __init__(self, quadratic: torch.Tensor, edges1: torch.Tensor, edges2: torch.Tensor, n1: int,
                 n2: int) -> None:
        prob, e1n, e2n = quadratic.shape
        dev, self.m, self.n1, self.e1n = quadratic.device, n2 + 1, n1, e1n
        m = self.m
        self.src, self.dst = edges1[:, 0], edges1[:, 1]  # (P, E1)
        key = self.src * n1 + self.dst
        first = _first_copy(key)
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
        """Handle of graph-1 edge (s, t) of problems prob (the zero row if absent) for `at_row`; (N, ...) indices."""
        p = prob.view(-1, *([1] * (s.dim() - 1)))
        a = torch.take(self.eid, p * self.n1 * self.n1 + s * self.n1 + t)
        return (p * (self.e1n + 1) + a) * self.m

    def at_row(self, row: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Q(edge, u, v) for handles from `edge_row` (broadcast)."""
        return torch.take(self.flat, (row + u) * self.m + v)


def _adjacency(node: torch.Tensor, other: torch.Tensor, m: int) -> tuple[torch.Tensor, ...]:
    """Adjacency lists of P graphs with edges (node_b, other_b), listed under node in edge order.

    Returns, for the P * m (problem, node) keys: start (P * m,) and degree (P * m,) of each list in the flat
    edge ids (P * E,) and other ends (P * E,); and the same lists padded to the largest degree, (P * m, width)
    edge ids (E for padding) and other ends (m - 1, the "unmatched" column, for padding).
    """
    prob, num_e = node.shape
    dev = node.device
    key = (torch.arange(prob, device=dev)[:, None] * m + node).flatten()  # (P * E,)
    order = torch.sort(key, stable=True).indices
    degree = torch.bincount(key, minlength=prob * m)
    start = degree.cumsum(0) - degree
    grouped, ids, ends = key[order], order % max(num_e, 1), other.flatten()[order]
    width = max(int(degree.max()), 1) if num_e else 1  # one host read per solve
    slot = torch.arange(prob * num_e, device=dev) - start[grouped]
    padded_ids = torch.full((prob * m, width), num_e, device=dev, dtype=torch.long)
    padded_ends = torch.full((prob * m, width), m - 1, device=dev, dtype=torch.long)
    padded_ids[grouped, slot] = ids
    padded_ends[grouped, slot] = ends
    return start, degree, ids, ends, padded_ids, padded_ends


class SparsePairTable:
    """Q kept per edge pair: cost[p, a, b] with parallel edges merged (row E1 and column E2 zero), graph 2 as
    adjacency lists. Same queries and values as `DensePairTable`; see the module docstring."""

    def __init__(self, quadratic: torch.Tensor, edges1: torch.Tensor, edges2: torch.Tensor, n1: int,
                 n2: int) -> None:
        prob, e1n, e2n = quadratic.shape
        dev, self.m, self.n1, self.e1n, self.e2n = quadratic.device, n2 + 1, n1, e1n, e2n
        m = self.m
        self.src, self.dst = edges1[:, 0], edges1[:, 1]  # (P, E1)
        key1, key2 = self.src * n1 + self.dst, edges2[:, 0] * m + edges2[:, 1]
        first1, first2 = _first_copy(key1), _first_copy(key2)
        cost = torch.zeros(prob, e1n + 1, e2n + 1, device=dev, dtype=quadratic.dtype)
        ids1, ids2 = torch.arange(e1n, device=dev), torch.arange(e2n, device=dev)
        if dev.type == "cpu" and bool((first1 == ids1).all()) and bool((first2 == ids2).all()):
            cost[:, :e1n, :e2n] += quadratic  # no parallel edges (kNN graphs): 0 + q, as the merges below compute
        else:  # the dense table's two merges, in the same order: parallel graph-2 edges, then graph-1 edges
            per_edge = torch.zeros(prob, e1n, e2n + 1, device=dev, dtype=quadratic.dtype)
            per_edge.scatter_add_(2, first2[:, None, :].expand(prob, e1n, e2n), quadratic)
            cost.scatter_add_(1, first1[:, :, None].expand(-1, -1, e2n + 1), per_edge)
        self.cost, self.flat = cost, cost.view(-1)
        self.eid1 = torch.full((prob, n1 * n1), e1n, device=dev, dtype=torch.long).scatter_(1, key1, first1)
        self.eid2 = torch.full((prob, m * m), e2n, device=dev, dtype=torch.long).scatter_(1, key2, first2)
        self.s2, self.t2 = edges2[:, 0], edges2[:, 1]
        # Graph 2's edges (., v) by v and (u, .) by u: the pairs (a, b) a gradient visits. Lists padded to the largest
        # degree need no host read; kNN out-degrees are all k, but in-degrees have hubs several times k, so on the
        # host such lists are walked as they are (a host read of their total length per gradient).
        self.lists = (_adjacency(self.t2, self.s2, m), _adjacency(self.s2, self.t2, m))
        self.ragged = [dev.type == "cpu" and lists[4].numel() > 4 * max(e2n, 1) * prob for lists in self.lists]
        self._bound: tuple[torch.Tensor, ...] | None = None

    def _bind(self, prob: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self._bound is None or self._bound[0] is not prob:
            src, dst = self.src[prob], self.dst[prob]  # (N, E1)
            rows = prob[:, None] * (self.e1n + 1) + torch.arange(self.e1n, device=prob.device)
            self._bound = (prob, src, dst, rows * (self.e2n + 1), prob[:, None] * self.m)
        return self._bound[1:]

    def gradient(self, maps: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
        """(K + K^T) y for matchings given as maps (N, n1) of problems prob (N,): (N, n1, m)."""
        src, dst, base, node0 = self._bind(prob)
        num, size = maps.shape[0], self.n1 * self.m
        out = []
        # Q(a, u, p[t_a]) lands on (s_a, u) for the graph-2 edges (u, p[t_a]); Q(a, p[s_a], v) on (t_a, v).
        for lands, mapped, lists, ragged in ((src, dst, self.lists[0], self.ragged[0]),
                                             (dst, src, self.lists[1], self.ragged[1])):
            node = node0 + maps.gather(1, mapped)  # (N, E1): key of the graph-2 node a's other end is mapped to
            dest0 = lands * self.m + torch.arange(num, device=maps.device)[:, None] * size  # (N, E1)
            start, degree, ids, ends, padded_ids, padded_ends = lists
            if ragged:  # every (a, b) pair once, a-major: (T,); index_select, not [] or take, for speed
                count = _read(degree, node).flatten()
                pair = torch.repeat_interleave(count)  # flat (n, a) of each pair
                first = (count.cumsum(0) - count - _read(start, node).flatten()).index_select(0, pair)
                edge = torch.arange(pair.shape[0], device=maps.device) - first
                vals = self.flat.index_select(0, base.flatten().index_select(0, pair) + ids.index_select(0, edge))
                dest = dest0.flatten().index_select(0, pair) + ends.index_select(0, edge)
            else:  # (N, E1, width), padding reads the zero column and lands on the "unmatched" column
                rows = node.flatten()
                vals = _read(self.flat, base.flatten()[:, None] + padded_ids.index_select(0, rows)).flatten()
                dest = (dest0.flatten()[:, None] + padded_ends.index_select(0, rows)).flatten()
            out.append(torch.zeros(num * size, device=maps.device, dtype=self.flat.dtype).scatter_add_(0, dest, vals))
        return (out[0] + out[1]).view(num, self.n1, self.m)

    def uniform_gradient(self) -> torch.Tensor:
        """(K + K^T) applied to the all-ones matrix: (P, n1, m)."""
        prob, e1n, e2n = self.cost.shape[0], self.e1n, self.e2n
        edge_costs = self.cost[:, :e1n, :e2n]
        by = []
        for ends in (self.s2, self.t2):  # sum over v of Q(a, u, v), then over u of Q(a, u, v)
            by.append(torch.zeros(prob, e1n, self.m, device=self.flat.device, dtype=self.flat.dtype)
                      .scatter_add_(2, ends[:, None, :].expand(prob, e1n, e2n), edge_costs))
        out = torch.zeros(prob, self.n1, self.m, device=self.flat.device, dtype=self.flat.dtype)
        out.scatter_add_(1, self.src[:, :, None].expand_as(by[0]), by[0])
        return out.scatter_add_(1, self.dst[:, :, None].expand_as(by[1]), by[1])

    def quadratic_value(self, maps: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
        """Quadratic part of the objective of maps (N, n1): (N,)."""
        src, dst = self.src[prob], self.dst[prob]
        b = self.eid2[prob[:, None], maps.gather(1, src) * self.m + maps.gather(1, dst)]  # (N, E1)
        a = torch.arange(self.e1n, device=maps.device)[None, :]
        return self.cost[prob[:, None], a, b].sum(1)

    def edge_row(self, prob: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Handle of graph-1 edge (s, t) of problems prob (the zero row if absent) for `at_row`; (N, ...) indices."""
        p = prob.view(-1, *([1] * (s.dim() - 1)))
        a = _read(self.eid1.view(-1), p * self.n1 * self.n1 + s * self.n1 + t)
        return (p * (self.e1n + 1) + a) * (self.e2n + 1), p * self.m * self.m

    def at_row(self, row: tuple[torch.Tensor, torch.Tensor], u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Q(edge, u, v) for handles from `edge_row` (broadcast)."""
        return _read(self.flat, row[0] + _read(self.eid2.view(-1), row[1] + u * self.m + v))


PAIR_TABLES = {"sparse": SparsePairTable, "dense": DensePairTable}
