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

import numpy as np

from mpcompile.errors import UnsupportedModelError, UsageError
from mpcompile.numerics._permutation_search import (  # the algorithm below lives there
    _ASSIGN_PATIENCE,
    _POLISH_SHARE,
    _OutOfBudget,
    _Search,
    _top_sum,
)

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
