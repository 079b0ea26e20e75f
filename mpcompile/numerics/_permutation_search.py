"""The permutation search's machinery: move tables, the batched evaluator and the local search.

Why apart from ``permutation.py``: that module is the public API (objective, efficacy, the
budgeted search over one or many layers, the worker processes); this one is the algorithm its
docstring describes, one tightly coupled state machine (``_Search`` calls the evaluator and the
tables on every step), which is why it stays one module of ~430 lines.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
from scipy.optimize import linear_sum_assignment

# Float32 elements one batched block evaluation may touch: large enough to amortise numpy call
# overhead, small enough to stay near cache and to check the clock every few milliseconds.
_CHUNK_ELEMS = 1 << 21
# Most groups one assignment move spans: its gain matrix is groups² × rows.
_ASSIGN_ELEMS = 1 << 22
_ASSIGN_MAX_GROUPS = 256
# Pairs of groups are tracked (pair moves, tabu search) only below this many pairs (~C <= 8000).
_MAX_PAIRS = 2_000_000
# Three-group repartitions are tracked (and used in the final polish) only below this many triples.
_MAX_TRIPLES = 20_000
# Largest block partition table we are willing to enumerate for a general n:m.
_MAX_PARTITIONS = 10_000
# A pair of groups just repartitioned stays frozen for this many steps plus a random share of it.
_TABU_TENURE = 5
# The tabu walk stops after this many moves without a new best, per tracked pair of groups (and
# at least _TABU_STALL_MIN): on a small layer (C = 32: 28 pairs) the walk has seen its whole
# neighbourhood many times over within milliseconds, and running on to the clock made a model
# of 300 such layers spend 300 budgets (75 s) finding nothing. Large layers hit the clock first.
_TABU_STALL_PER_PAIR = 4
_TABU_STALL_MIN = 100
# Failed assignment moves in a row after which assignments count as converged.
_ASSIGN_PATIENCE = 3
# Share of the budget kept for the final three-group polish.
_POLISH_SHARE = 0.1
# Batched steps taken whatever the clock says (when the budget is > 0): building the move tables
# on a first call, or a loaded machine, must not turn a short budget into no search at all.
_MIN_STEPS = 4




@dataclass(frozen=True)
class _Tables:
    """Partitions of ``b·m`` local channels into ``b`` groups of ``m``, and how to score them."""

    b: int
    m: int
    subsets: np.ndarray
    """``[ns, m]`` local channel ids of every m-subset, in evaluation order."""
    parts: np.ndarray
    """``[np, b]`` indices into ``subsets``; row 0 is the unchanged grouping."""
    pairs: np.ndarray | None
    """2:4 fast path: ``[npairs, 2]`` lexicographic channel pairs."""
    steps: tuple[tuple[int, int], ...]
    """2:4 fast path: (first pair, start of the suffix of pairs that lie after it)."""


@cache
def _tables(b: int, n: int, m: int) -> _Tables:
    k = b * m
    fast = (n, m) == (2, 4)
    if fast:
        # Subset {i<j<k<l} is split as pair (i,j) + pair (k,l); the pairs (k,l) with k > j are a
        # suffix of the lexicographic pair list, so each (i,j) scores a run of subsets at once.
        pairs = list(itertools.combinations(range(k), 2))
        first = {}
        for idx, (p, _) in enumerate(pairs):
            first.setdefault(p, idx)
        steps, order = [], []
        for idx, (i, j) in enumerate(pairs):
            if j > k - 3:
                continue
            start = first[j + 1]
            steps.append((idx, start))
            order.extend((i, j, p, q) for p, q in pairs[start:])
        subsets = order
        pairs_arr = np.asarray(pairs, dtype=np.int64)
    else:
        subsets = list(itertools.combinations(range(k), m))
        pairs_arr, steps = None, []
    index = {s: i for i, s in enumerate(subsets)}
    parts: list[list[int]] = []

    def rec(rest: tuple[int, ...], acc: list[int]) -> None:
        if not rest:
            parts.append(acc)
            return
        for comb in itertools.combinations(rest[1:], m - 1):
            grp = (rest[0], *comb)
            rec(tuple(x for x in rest if x not in grp), acc + [index[grp]])

    rec(tuple(range(k)), [])  # lexicographic recursion: the identity grouping comes first
    return _Tables(
        b=b,
        m=m,
        subsets=np.asarray(subsets, dtype=np.int64),
        parts=np.asarray(parts, dtype=np.int64),
        pairs=pairs_arr,
        steps=tuple(steps),
    )


def _n_partitions(b: int, m: int) -> int:
    return math.factorial(b * m) // (math.factorial(m) ** b * math.factorial(b))


def _top_sum(x: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Sum of the ``n`` largest entries along a short ``axis`` (that axis removed).

    Closed forms for the 2:4 shapes: sorting 4-element runs is an order of magnitude slower
    than a few elementwise max / add passes over the same data.
    """
    xs = np.moveaxis(x, axis, 0)
    k = xs.shape[0]
    if n >= k:
        return xs.sum(axis=0)
    if n == 1:
        return xs.max(axis=0)
    if (n, k) == (2, 4):
        # the top two are both in {0,1}, both in {2,3}, or the larger of each pair
        out = np.maximum(xs[0], xs[1])
        out += np.maximum(xs[2], xs[3])
        np.maximum(out, xs[0] + xs[1], out=out)
        np.maximum(out, xs[2] + xs[3], out=out)
        return out
    if n == k - 1:
        return xs.sum(axis=0) - xs.min(axis=0)
    return np.sort(xs, axis=0)[k - n :].sum(axis=0)


# --------------------------------------------------------------------------- evaluator


class _Evaluator:
    """Scores candidate groupings on ``T = S.T`` (channel-major float32, max entry 1)."""

    def __init__(self, t: np.ndarray, n: int, m: int) -> None:
        self.t = t
        self.n, self.m = n, m
        self.rows = t.shape[1]
        self.ones = np.ones(self.rows, dtype=np.float32)
        self._work = np.empty(0, dtype=np.float32)

    def _buffer(self, size: int) -> np.ndarray:
        # One reused buffer: fresh large allocations page-fault on every call and cost more than
        # the arithmetic they hold.
        if self._work.size < size:
            self._work = np.empty(size, dtype=np.float32)
        return self._work[:size]

    def group_scores(self, groups: np.ndarray) -> np.ndarray:
        """Kept score of every group (``[G, m]`` channel ids), float64 ``[G]``."""
        return _top_sum(self.t[groups], self.n, axis=1).sum(axis=1, dtype=np.float64)

    def block_scores(self, chans: np.ndarray, tab: _Tables) -> np.ndarray:
        """Score of every partition of every block: ``chans [nb, b·m]`` -> ``[nb, partitions]``."""
        nb, rows = chans.shape[0], self.rows
        ns = tab.subsets.shape[0]
        x = self.t[chans.T]  # [b·m, nb, rows]
        out = self._buffer(ns * nb * rows).reshape(ns, nb, rows)
        if tab.pairs is not None:
            a = x[tab.pairs[:, 0]]
            c = x[tab.pairs[:, 1]]
            both = a + c  # sum of the pair
            top = np.maximum(a, c, out=a)  # larger of the pair
            npairs = tab.pairs.shape[0]
            o = 0
            for p, start in tab.steps:
                dst = out[o : o + npairs - start]
                np.add(top[start:], top[p], out=dst)
                np.maximum(dst, both[start:], out=dst)
                np.maximum(dst, both[p], out=dst)
                o += npairs - start
        else:
            out[...] = _top_sum(
                x[tab.subsets], self.n, axis=1
            )  # [ns, m, nb, rows] -> [ns, nb, rows]
        sc = (out.reshape(-1, rows) @ self.ones).reshape(ns, nb).T.astype(np.float64)
        ps = np.take(sc, tab.parts[:, 0], axis=1)
        for j in range(1, tab.b):
            ps += np.take(sc, tab.parts[:, j], axis=1)
        return ps

    def insertion_gains(self, rest: np.ndarray, chans: np.ndarray) -> np.ndarray:
        """``[g, c]``: kept score of ``rest[g]`` (a group minus one slot) plus channel ``c``."""
        x = self.t[rest]  # [g, m-1, rows]
        top_n = _top_sum(x, self.n, axis=1)
        top_n1 = _top_sum(x, self.n - 1, axis=1) if self.n > 1 else np.zeros_like(top_n)
        y = self.t[chans]  # [c, rows]
        work = self._buffer(rest.shape[0] * chans.shape[0] * self.rows).reshape(
            rest.shape[0], chans.shape[0], self.rows
        )
        np.add(top_n1[:, None, :], y[None, :, :], out=work)
        np.maximum(work, top_n[:, None, :], out=work)
        return (work.reshape(-1, self.rows) @ self.ones).reshape(rest.shape[0], chans.shape[0])


# --------------------------------------------------------------------------- search state


class _OutOfBudget(Exception):
    """Raised inside the search when the clock or the step cap runs out."""


class _Search:
    """Grouping state, per-block caches and the moves; every random choice comes from ``rng``."""

    def __init__(
        self,
        t: np.ndarray,
        n: int,
        m: int,
        rng: np.random.Generator,
        deadline: float,
        max_iterations: int | None,
    ) -> None:
        self.ev = _Evaluator(t, n, m)
        self.n, self.m = n, m
        self.rows = t.shape[1]
        self.g = t.shape[0] // m
        self.rng = rng
        self.deadline = deadline
        self.max_iterations = max_iterations
        self.min_steps = _MIN_STEPS
        self.steps = 0
        self.done = False  # set once the unstructured bound is reached: nothing left to gain
        # Gains below this are float32 rounding of row sums, not improvements (max entry is 1).
        self.tol = 1e-6 * self.rows
        self.clock = 1
        self.stamp = np.ones(self.g, dtype=np.int64)  # when each group last changed
        self.blocks: dict[int, np.ndarray] = {}
        self.evald: dict[int, np.ndarray] = {}  # when each block was last scored
        self.best_gain: dict[int, np.ndarray] = {}  # its best non-identity move then (may be < 0)
        self.best_part: dict[int, np.ndarray] = {}
        self.tables: dict[int, _Tables] = {}
        if (
            self.g >= 2
            and math.comb(self.g, 2) <= _MAX_PAIRS
            and _n_partitions(2, m) <= _MAX_PARTITIONS
        ):
            a, c = np.triu_indices(self.g, 1)
            self._add_blocks(2, np.stack([a, c], axis=1))
        if (
            self.g >= 3
            and math.comb(self.g, 3) <= _MAX_TRIPLES
            and _n_partitions(3, m) <= _MAX_PARTITIONS
        ):
            triples = np.asarray(list(itertools.combinations(range(self.g), 3)), dtype=np.int64)
            self._add_blocks(3, triples)

    def _add_blocks(self, b: int, blocks: np.ndarray) -> None:
        self.blocks[b] = blocks
        self.evald[b] = np.zeros(len(blocks), dtype=np.int64)
        self.best_gain[b] = np.zeros(len(blocks))
        self.best_part[b] = np.zeros(len(blocks), dtype=np.int64)
        self.tables[b] = _tables(b, self.n, self.m)

    # ---- bookkeeping

    def tick(self) -> None:
        """Account for one batched step, or stop the search if none is left."""
        if (
            self.done
            or (self.steps >= self.min_steps and time.perf_counter() > self.deadline)
            or (self.max_iterations is not None and self.steps >= self.max_iterations)
        ):
            raise _OutOfBudget
        self.steps += 1

    def touch(self, groups_changed: np.ndarray) -> None:
        self.clock += 1
        self.stamp[groups_changed] = self.clock

    def stale(self, b: int) -> np.ndarray:
        """Blocks whose cached best move predates a change of one of their groups."""
        return np.flatnonzero(self.evald[b] <= self.stamp[self.blocks[b]].max(axis=1))

    def chunk(self, b: int) -> int:
        return max(1, _CHUNK_ELEMS // (self.tables[b].subsets.shape[0] * self.rows))

    def score_blocks(self, groups: np.ndarray, b: int, idx: np.ndarray) -> None:
        """Refresh the cached best move of blocks ``idx`` (one batched call)."""
        tab = self.tables[b]
        chans = groups[self.blocks[b][idx]].reshape(idx.size, -1)
        ps = self.ev.block_scores(chans, tab)
        best = ps[:, 1:].argmax(axis=1) + 1
        self.best_part[b][idx] = best
        self.best_gain[b][idx] = ps[np.arange(idx.size), best] - ps[:, 0]
        self.clock += 1
        self.evald[b][idx] = self.clock

    def apply(self, groups: np.ndarray, b: int, i: int) -> None:
        tab = self.tables[b]
        gs = self.blocks[b][i]
        chans = groups[gs].reshape(-1)
        groups[gs] = chans[tab.subsets[tab.parts[self.best_part[b][i]]]]

    # ---- moves

    def sweep(self, groups: np.ndarray, b: int) -> float:
        """Best repartition of every stale block of ``b`` groups, improving moves only."""
        if b not in self.blocks:
            return 0.0
        todo = self.stale(b)
        if todo.size == 0:
            return 0.0
        todo = self.rng.permutation(todo)
        per = self.chunk(b)
        total = 0.0
        gains = self.best_gain[b]
        for start in range(0, todo.size, per):
            self.tick()
            idx = todo[start : start + per]
            self.score_blocks(groups, b, idx)
            better = idx[gains[idx] > self.tol]
            if better.size == 0:
                continue
            better = better[np.argsort(-gains[better], kind="stable")]
            used = np.zeros(self.g, dtype=bool)
            for i in better:  # non-overlapping, largest gain first (ASP's greedy phase)
                gs = self.blocks[b][i]
                if used[gs].any():
                    continue
                used[gs] = True
                self.apply(groups, b, i)
                total += gains[i]
            self.touch(np.flatnonzero(used))
        return total

    def assign(self, groups: np.ndarray) -> float:
        """Vacate one random slot in many groups and refill the slots by an exact assignment."""
        g = self.g
        cap = min(_ASSIGN_MAX_GROUPS, max(2, int(math.sqrt(_ASSIGN_ELEMS / self.rows))))
        sel = self.rng.permutation(g)[:cap] if g > cap else np.arange(g)
        self.tick()
        slots = self.rng.integers(0, self.m, sel.size)
        sub = groups[sel]
        order = np.arange(sel.size)
        moved = sub[order, slots]
        keep = np.ones(sub.shape, dtype=bool)
        keep[order, slots] = False
        gains = self.ev.insertion_gains(sub[keep].reshape(sel.size, self.m - 1), moved)
        rows, cols = linear_sum_assignment(gains, maximize=True)
        gain = float(gains[rows, cols].sum() - np.trace(gains))
        if gain <= self.tol:
            return 0.0
        sub[order, slots] = moved[cols]
        groups[sel] = sub
        self.touch(sel[cols != rows])
        return gain

    def descend(self, groups: np.ndarray, *, triples: bool) -> float:
        """Assignments until they stall, then pairs to a certified local optimum, then
        (optionally) triples; repeated while anything moves.

        Assignments go first: on wide layers one assignment step moves dozens of channels for
        the cost of a few dozen pair repartitions, so it is the better use of a short budget.
        """
        total = 0.0
        while True:
            failures = 0
            while failures < _ASSIGN_PATIENCE:
                gain = self.assign(groups)
                total += gain
                failures = 0 if gain > 0 else failures + 1
            gain = self.sweep(groups, 2)
            total += gain
            if gain > 0:
                continue
            if not triples:
                return total
            gain = self.sweep(groups, 3)
            total += gain
            if gain <= 0:
                return total

    def tabu(
        self, groups: np.ndarray, value: float, on_best: Callable[[np.ndarray, float], None]
    ) -> None:
        """Tabu search over pair repartitions: always take the best allowed move, even a worsening
        one; a pair just repartitioned may not move again for a few steps (unless that would
        beat the best seen), which forbids undoing the move at once. Runs until out of budget,
        or until it has gone ``_TABU_STALL_*`` moves without beating the best seen."""
        b = 2
        gains = self.best_gain[b]
        until = np.zeros(len(self.blocks[b]), dtype=np.int64)
        best = value
        it = 0
        stall_limit = max(_TABU_STALL_MIN, _TABU_STALL_PER_PAIR * len(self.blocks[b]))
        last_best = 0
        while it - last_best < stall_limit:
            todo = self.stale(b)
            per = self.chunk(b)
            for start in range(0, todo.size, per):
                self.tick()
                self.score_blocks(groups, b, todo[start : start + per])
            if todo.size == 0:
                self.tick()
            it += 1
            allowed = (until <= it) | (value + gains > best + self.tol)
            # random tie-break among equal gains keeps the walk from cycling on plateaus
            pick = np.where(allowed, gains + self.tol * 1e-3 * self.rng.random(gains.size), -np.inf)
            i = int(pick.argmax())
            if not np.isfinite(pick[i]):
                return
            self.apply(groups, b, i)
            value += gains[i]
            until[i] = it + _TABU_TENURE + int(self.rng.integers(0, _TABU_TENURE))
            self.touch(self.blocks[b][i])
            if value > best + self.tol:
                best = value
                last_best = it
                on_best(groups, value)


# --------------------------------------------------------------------------- driver
