"""Input-channel permutation search for N:M (2:4) sparsity, in vectorised numpy.

Why permute: 2:4 keeps the top 2 of every 4 *consecutive* reduction entries, so which channels
share a group decides how much importance survives. Reordering the input channels of a layer
(and folding the same reorder into the producer's output channels) is free at run time and
recovers part of the gap between plain 2:4 and unstructured 50% pruning.

The search only ever sees a nonnegative score matrix ``S[rows, C]`` (``C % m == 0``): magnitude
``|W|`` by default, or any per-entry importance (``|W|·‖X_j‖`` for Wanda / CAST-aware search).
For a conv whose reduction axis is ``(kh, kw, Cin)`` the permutation acts on ``Cin`` alone,
identically at every tap, so the caller reshapes ``[Cout, kh, kw, Cin]`` to
``[Cout·kh·kw, Cin]`` and every tap becomes extra rows. A permutation ``perm`` is applied as
``S[:, perm]``; the objective is :func:`kept_score` of the permuted matrix.

Quality is reported as ASP's *efficacy*: the fraction of the gap between the identity order and
the per-row unstructured bound (top ``C·n/m`` scores of every row) that the permutation closes.

Algorithm (local search over groupings; the order of groups and of channels inside a group does
not matter, so the state is a ``[G, m]`` array of channel ids):

* **Block repartition** (ASP's "stripe groups"): for a block of ``b`` groups (``b·m`` channels)
  score every one of its partitions into ``b`` groups -- 35 for two 2:4 groups, 5 775 for three --
  and take the best. Many blocks are scored in one batched numpy call; for 2:4 the kept score of
  a 4-subset split into channel pairs ``a``, ``b`` is ``max(max(a) + max(b), sum(a), sum(b))``,
  and the pairs that complete a given first pair form a contiguous suffix of the lexicographic
  pair list, so every subset is a broadcast over a slice (no gathers). "Don't-look" stamps skip
  blocks whose groups have not changed since they were last scored, which certifies a local
  optimum over all pairs of groups exactly.
* **Assignment move**: vacate one random slot in each of many groups and refill the slots by an
  exact linear assignment (``scipy.optimize.linear_sum_assignment``). The kept score of a group
  with channel ``x`` inserted is ``Σ_rows max(top_n(rest), top_{n-1}(rest) + x)``, so the gain
  matrix is two broadcasts. It moves dozens of channels at once along cycles that pairwise moves
  cannot see, and it is the cheapest progress on wide layers, so a descent starts with it.
* **Tabu search**: from the resulting local optimum, repeatedly apply the best pair repartition
  anywhere in the layer, even a worsening one; a pair just repartitioned is frozen for a few
  steps (unless moving it would beat the best seen). Only the pairs sharing a group with the
  last move are re-scored. On ASP's reference problem this beats iterated local search with
  random kicks by about half a point of efficacy at the same budget.
* **Polish**: when the layer has few enough triples of groups, the best grouping seen is
  finished with three-group repartitions (ASP's stripe-group size 12).

Every random choice comes from one seeded generator; the time budget only decides where that
trajectory stops (the best state seen is kept; a budget > 0 always buys a few steps), and ``max_iterations`` makes a run reproducible
step for step whatever the machine's speed.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import cache

import numpy as np
from scipy.optimize import linear_sum_assignment

from mpcompile.errors import UnsupportedModelError, UsageError

__all__ = [
    "PermutationInputError",
    "PermutationResult",
    "PermutationUsageError",
    "channel_blocks",
    "efficacy",
    "invert_permutation",
    "kept_score",
    "kept_score_24",
    "search_permutation",
    "search_permutations",
    "unstructured_bound",
]

logger = logging.getLogger(__name__)

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


class PermutationInputError(UnsupportedModelError, ValueError):
    """The score matrix cannot be searched (not 2-D, negative / non-finite, C % m != 0)."""


class PermutationUsageError(UsageError, ValueError):
    """The search options are inconsistent (bad n:m, negative budget)."""


@dataclass
class PermutationResult:
    perm: np.ndarray
    """int64 ``[C]``; apply as ``S[:, perm]`` (the new column ``j`` is old column ``perm[j]``)."""
    kept_before: float
    """Kept score of the identity order."""
    kept_after: float
    """Kept score of ``S[:, perm]``; never below ``kept_before``."""
    upper_bound: float
    """Unstructured bound: per row, the sum of its top ``C·n/m`` scores."""
    efficacy: float
    """``(kept_after - kept_before) / (upper_bound - kept_before)``; 0 when the gap is 0."""
    seconds: float
    iterations: int
    """Batched search steps taken (block-repartition batches, assignment solves, tabu moves)."""


# --------------------------------------------------------------------------- objective


def kept_score(s: np.ndarray, n: int = 2, m: int = 4) -> float:
    """Score kept by n:m pruning of ``s`` in its current column order (top ``n`` of every ``m``)."""
    s = np.asarray(s, dtype=np.float64)
    _check_nm(n, m)
    if s.ndim != 2 or s.shape[1] % m:
        raise PermutationInputError(
            f"kept_score needs a 2-D matrix with columns % {m} == 0, got {s.shape}"
        )
    return float(_top_sum(s.reshape(s.shape[0], -1, m), n, axis=2).sum())


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


def kept_score_24(s: np.ndarray) -> float:
    """Score kept by 2:4 pruning of ``s`` in its current column order."""
    return kept_score(s, 2, 4)


def unstructured_bound(s: np.ndarray, n: int = 2, m: int = 4) -> float:
    """What any n:m grouping could at best keep: per row, its top ``C·n/m`` scores."""
    s = np.asarray(s, dtype=np.float64)
    keep = s.shape[1] * n // m
    if keep == 0:
        return 0.0
    return float(np.partition(s, s.shape[1] - keep, axis=1)[:, s.shape[1] - keep :].sum())


def efficacy(kept_before: float, kept_after: float, upper_bound: float) -> float:
    """ASP's efficacy: share of the identity-to-unstructured gap closed; 0 if there is no gap."""
    gap = upper_bound - kept_before
    if gap <= 1e-12 * max(abs(upper_bound), 1.0):
        return 0.0
    return float((kept_after - kept_before) / gap)


def channel_blocks(w: np.ndarray, channel_axis: int = -1) -> np.ndarray:
    """``[rows, C]`` matrix of a weight (or score) tensor whose ``channel_axis`` is permuted.

    Every other axis becomes rows, so one permutation of the channels is searched for all of
    them at once: a conv ``[Cout, Cin, kh, kw]`` (ONNX layout, ``channel_axis=1``) gives
    ``[Cout·kh·kw, Cin]`` -- TensorRT groups ``Cin`` at every ``(cout, kh, kw)``, and a folded
    permutation reorders ``Cin`` identically at every tap. ONNX ``MatMul(X, W[K, N])`` needs
    ``channel_axis=0``. A copy is made only when the axes must move.
    """
    w = np.asarray(w)
    if w.ndim < 2:
        raise PermutationInputError(f"channel_blocks needs a tensor of rank >= 2, got {w.shape}")
    moved = np.moveaxis(w, channel_axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def invert_permutation(perm) -> np.ndarray:
    """``inv`` with ``inv[perm] = arange``: undoes ``x[..., perm]`` as ``y[..., inv]``."""
    perm = np.asarray(perm)
    if perm.ndim != 1 or not np.array_equal(np.sort(perm), np.arange(perm.size)):
        raise PermutationInputError("invert_permutation needs a permutation of 0..len-1")
    inv = np.empty(perm.size, dtype=np.int64)
    inv[perm] = np.arange(perm.size, dtype=np.int64)
    return inv


def _check_nm(n: int, m: int) -> None:
    if not (isinstance(n, (int, np.integer)) and isinstance(m, (int, np.integer)) and 0 < n < m):
        raise PermutationUsageError(f"n:m sparsity needs integers 0 < n < m, got {n}:{m}")


# --------------------------------------------------------------------------- block tables


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


def _validate(scores: np.ndarray, n: int, m: int, time_budget_s: float) -> np.ndarray:
    _check_nm(n, m)
    try:
        budget = float(time_budget_s)
    except (TypeError, ValueError):
        budget = math.nan
    if not (budget >= 0 and math.isfinite(budget)):
        raise PermutationUsageError(
            f"time_budget_s must be a finite number >= 0, got {time_budget_s!r}"
        )
    s = np.asarray(scores)
    if s.ndim != 2:
        raise PermutationInputError(
            f"permutation search needs a 2-D score matrix [rows, C], got shape {s.shape}"
        )
    if not np.issubdtype(s.dtype, np.number) or np.iscomplexobj(s):
        raise PermutationInputError(f"scores must be real numbers, got dtype {s.dtype}")
    if s.shape[1] == 0 or s.shape[1] % m:
        raise PermutationInputError(
            f"the permuted axis has {s.shape[1]} channels, not a positive multiple of {m}"
        )
    s = s.astype(np.float64, copy=False)
    if not np.isfinite(s).all():
        raise PermutationInputError("scores contain NaN or infinity")
    if (s < 0).any():
        raise PermutationInputError("scores must be nonnegative (pass |W| or another importance)")
    return s


def search_permutation(
    scores: np.ndarray,
    *,
    time_budget_s: float = 1.0,
    seed: int = 0,
    n: int = 2,
    m: int = 4,
    max_iterations: int | None = None,
) -> PermutationResult:
    """Input-channel order maximising the score n:m pruning keeps, within ``time_budget_s``.

    ``scores`` is ``[rows, C]``, nonnegative; the permutation acts on the columns. The result is
    never worse than the identity. ``max_iterations`` caps the batched search steps so that a run
    is exactly reproducible whatever the machine's speed (give a generous time budget with it).
    """
    t0 = time.perf_counter()
    s = _validate(scores, n, m, time_budget_s)
    if max_iterations is not None and max_iterations < 0:
        raise PermutationUsageError(f"max_iterations must be >= 0, got {max_iterations}")
    rows, c = s.shape
    t_kept = time.perf_counter()
    kept_before = kept_score(s, n, m)
    t_kept = time.perf_counter() - t_kept
    bound = unstructured_bound(s, n, m)
    identity = np.arange(c, dtype=np.int64)
    scale = float(s.max()) if s.size else 0.0
    g = c // m
    if g < 2 or scale <= 0.0 or rows == 0 or bound - kept_before <= 1e-12 * max(bound, 1.0):
        return PermutationResult(
            identity, kept_before, kept_before, bound, 0.0, time.perf_counter() - t0, 0
        )

    t = (s.astype(np.float32) * np.float32(1.0 / scale)).T.copy()
    # Stop early enough for the final float64 re-scoring (a permuted copy of the matrix).
    deadline = t0 + time_budget_s - (4.0 * t_kept + 0.01)
    search = _Search(t, n, m, np.random.default_rng(seed), deadline, max_iterations)
    if time_budget_s <= 0.0:
        search.min_steps = 0
    groups = identity.reshape(g, m).copy()
    best = {"groups": groups.copy(), "value": float(search.ev.group_scores(groups).sum())}

    reachable = bound / scale - search.tol

    def keep_if_better(state: np.ndarray, _tracked: float | None = None) -> None:
        # Re-score exactly rather than trusting the float32 running sum of move gains.
        value = float(search.ev.group_scores(state).sum())
        if value > best["value"]:
            best["groups"], best["value"] = state.copy(), value
            search.done = value >= reachable

    can_polish = 3 in search.blocks
    # Leave a slice of the budget for the triple polish of the best grouping found.
    search.deadline = deadline - (_POLISH_SHARE * time_budget_s if can_polish else 0.0)
    try:
        search.descend(groups, triples=False)
        keep_if_better(groups)
        if 2 in search.blocks:
            search.tabu(groups, best["value"], keep_if_better)
        else:  # too many groups to track pairs: keep making assignment moves
            failures = 0
            while failures < _ASSIGN_PATIENCE * 10:
                failures = 0 if search.assign(groups) > 0 else failures + 1
            keep_if_better(groups)
    except _OutOfBudget:
        keep_if_better(groups)  # an interrupted descent only improved on where it started
    if can_polish:
        groups = best["groups"].copy()
        search.deadline = deadline
        search.touch(np.arange(g))  # the cached block moves belong to another grouping
        try:
            search.descend(groups, triples=True)
        except _OutOfBudget:
            pass
        keep_if_better(groups)
    best_groups = best["groups"]
    perm = best_groups.ravel().astype(np.int64)
    kept_after = kept_score(s[:, perm], n, m)
    if kept_after < kept_before:  # float32 search noise on a near-flat landscape
        perm, kept_after = identity, kept_before
    eff = efficacy(kept_before, kept_after, bound)
    seconds = time.perf_counter() - t0
    logger.debug(
        "permutation search %dx%d (%d:%d): efficacy %.1f%% in %.2fs, %d steps",
        rows,
        c,
        n,
        m,
        100 * eff,
        seconds,
        search.steps,
    )
    return PermutationResult(perm, kept_before, kept_after, bound, eff, seconds, search.steps)


def search_permutations(
    problems: dict[Hashable, np.ndarray],
    *,
    time_budget_s: float,
    seed: int = 0,
    max_iterations: int | None = None,
    workers: int | None = None,
    on_done: Callable[[Hashable], None] | None = None,
) -> dict[Hashable, PermutationResult]:
    """:func:`search_permutation` on independent score matrices, one per CPU core at a time.

    Why processes: each search is a time-budgeted loop of small numpy steps that keeps one core
    busy and holds the GIL, so a model's searches (36 on ViT-B/16 at 0.5 s each) would run
    one after another. Each worker (``python -m mpcompile.numerics._permutation_worker``,
    one BLAS thread) takes every ``workers``-th problem; the budget stays per search.
    ``on_done`` is called with each key as its search finishes (from reader threads).
    """
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(workers, len(problems)))
    results: dict[Hashable, PermutationResult] = {}
    if workers == 1:
        for key, scores in problems.items():
            results[key] = search_permutation(scores, time_budget_s=time_budget_s, seed=seed,
                                              max_iterations=max_iterations)
            if on_done is not None:
                on_done(key)
        return results
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    keys = list(problems)
    items = list(problems.items())
    procs = []
    for w in range(workers):
        jobs = [(key, scores, time_budget_s, seed, max_iterations) for key, scores in items[w::workers]]
        proc = subprocess.Popen([sys.executable, "-m", "mpcompile.numerics._permutation_worker"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        procs.append((proc, len(jobs)))
        # Writing in a thread: a pipe holds 64 KB, and the worker reads all jobs before answering.
        threading.Thread(target=_send, args=(proc, jobs), daemon=True).start()
        del jobs
    del items  # the send threads hold the score matrices only until they are written
    errors: list[str] = []

    def collect(proc: subprocess.Popen, count: int) -> None:
        try:
            for _ in range(count):
                key, result = pickle.load(proc.stdout)
                results[key] = result
                if on_done is not None:
                    on_done(key)
        except (EOFError, pickle.UnpicklingError) as exc:
            errors.append(f"{type(exc).__name__}: {proc.stderr.read().decode(errors='replace')[-400:]}")

    readers = [threading.Thread(target=collect, args=item) for item in procs]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    for proc, _ in procs:
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    if errors:
        raise RuntimeError(f"a permutation search worker failed: {errors[0]}")
    return {key: results[key] for key in keys}


def _send(proc: subprocess.Popen, jobs: list) -> None:
    with contextlib.suppress(BrokenPipeError):
        pickle.dump(jobs, proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        proc.stdin.close()
    jobs.clear()
