"""Input-channel permutation search: objective, bookkeeping, and search quality on known answers."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from mpcompile.errors import MpcompileError
from mpcompile.numerics import _permutation_search as search_mod
from mpcompile.numerics.permutation import (
    PermutationInputError,
    PermutationUsageError,
    channel_blocks,
    efficacy,
    invert_permutation,
    kept_score,
    kept_score_24,
    search_permutation,
    unstructured_bound,
)


def _kept_loops(s: np.ndarray, n: int, m: int) -> float:
    """Reference objective with plain Python loops: per row and group, the top n of m."""
    total = 0.0
    for row in s.tolist():
        for start in range(0, len(row), m):
            total += sum(sorted(row[start : start + m], reverse=True)[:n])
    return total


def _planted(rows: int, c: int, seed: int) -> np.ndarray:
    """Scores with a hidden grouping that keeps the unstructured bound, columns shuffled.

    In every hidden group of 4 and every row, 2 entries are drawn from [1, 2) and 2 from [0, 1),
    so the per-row top half is exactly the "large" entries and the hidden grouping keeps them all.
    """
    rng = np.random.default_rng(seed)
    g = c // 4
    large = np.argsort(rng.random((rows, g, 4)), axis=2)[:, :, :2]
    mask = np.zeros((rows, g, 4), dtype=bool)
    np.put_along_axis(mask, large, True, axis=2)
    s = rng.random((rows, c)) + mask.reshape(rows, c)
    return s[:, rng.permutation(c)]


def _asp_reference_matrix() -> np.ndarray:
    """ASP permutation_test.py's default input: np.random.seed(1); np.random.rand(128, 64)."""
    return np.random.RandomState(1).rand(128, 64)


def _is_permutation(p: np.ndarray, c: int) -> bool:
    return p.dtype == np.int64 and p.shape == (c,) and np.array_equal(np.sort(p), np.arange(c))


# --------------------------------------------------------------------------- objective


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 4), (2, 8), (1, 2)])
def test_kept_score_matches_python_loops(n: int, m: int) -> None:
    s = np.random.default_rng(3).random((5, 16))
    assert kept_score(s, n, m) == pytest.approx(_kept_loops(s, n, m), rel=1e-12)


def test_kept_score_24_matches_python_loops_with_ties_and_zeros() -> None:
    s = np.abs(np.random.default_rng(4).standard_normal((7, 12)))
    s[0, :4] = 0.5  # all-equal group
    s[1, 4:8] = 0.0  # dead group
    s[2, 8:12] = [3.0, 3.0, 1.0, 3.0]
    assert kept_score_24(s) == pytest.approx(_kept_loops(s, 2, 4), rel=1e-12)


def test_unstructured_bound_is_per_row_top_half() -> None:
    s = np.random.default_rng(5).random((6, 16))
    expected = sum(sum(sorted(row, reverse=True)[:8]) for row in s.tolist())
    assert unstructured_bound(s) == pytest.approx(expected, rel=1e-12)
    assert unstructured_bound(s, 1, 4) == pytest.approx(
        sum(sum(sorted(row, reverse=True)[:4]) for row in s.tolist()), rel=1e-12
    )


def test_efficacy_by_hand() -> None:
    # Row 0 has its four large entries in channels 0-3, row 1 in channels 4-7: in the identity
    # order each row keeps 9+8 from its "large" group and 1+1 from the other.
    s = np.array([[9, 8, 7, 6, 1, 1, 1, 1], [1, 1, 1, 1, 9, 8, 7, 6]], dtype=float)
    assert kept_score_24(s) == 38.0  # (17 + 2) * 2
    assert unstructured_bound(s) == 60.0  # (9 + 8 + 7 + 6) * 2
    # Swapping channels 2,3 with 4,5 groups {9,8,9,8} and {7,6,7,6}: (17 + 13) * 2 = 60.
    assert kept_score_24(s[:, [0, 1, 4, 5, 2, 3, 6, 7]]) == 60.0
    # Swapping only channel 3 with 4: groups {9,8,7,1} | {6,1,1,1} and {1,1,1,9} | {1,8,7,6}.
    assert kept_score_24(s[:, [0, 1, 2, 4, 3, 5, 6, 7]]) == (17 + 7) + (10 + 15)
    assert efficacy(38.0, 49.0, 60.0) == 0.5
    assert efficacy(38.0, 38.0, 38.0) == 0.0  # no gap: defined as 0, not NaN

    result = search_permutation(s, time_budget_s=2.0)
    assert (result.kept_before, result.upper_bound) == (38.0, 60.0)
    assert result.kept_after == 60.0
    assert result.efficacy == 1.0
    # optimal groupings take two of row 0's large channels and two of row 1's
    for start in (0, 4):
        assert np.sort(result.perm[start : start + 4] // 4).tolist() == [0, 0, 1, 1]


def test_asp_reference_problem_matches_asp_published_baseline() -> None:
    # ASP's README table for this exact matrix: "default 2:4 ... 2852.377", "50% rows ... 3042.332".
    s = _asp_reference_matrix()
    assert kept_score_24(s) == pytest.approx(2852.377, abs=1e-3)
    assert unstructured_bound(s) == pytest.approx(3042.332, abs=1e-3)


# --------------------------------------------------------------------------- block tables


@pytest.mark.parametrize(("b", "n", "m", "count"), [(2, 2, 4, 35), (3, 2, 4, 5775), (2, 1, 4, 35)])
def test_block_tables_enumerate_every_partition_once(b: int, n: int, m: int, count: int) -> None:
    tab = search_mod._tables(b, n, m)
    groups = tab.subsets[tab.parts]  # [partitions, b, m]
    assert groups.shape == (count, b, m)
    assert np.array_equal(groups[0].ravel(), np.arange(b * m))  # identity first
    assert all(np.array_equal(np.sort(p.ravel()), np.arange(b * m)) for p in groups)
    canonical = {frozenset(frozenset(g.tolist()) for g in p) for p in groups}
    assert len(canonical) == count


@pytest.mark.parametrize(("b", "n", "m"), [(2, 2, 4), (3, 2, 4), (2, 1, 4), (2, 3, 4)])
def test_block_scores_match_brute_force(b: int, n: int, m: int) -> None:
    rng = np.random.default_rng(6)
    s = rng.random((9, 16))
    ev = search_mod._Evaluator(np.ascontiguousarray(s.T, dtype=np.float32), n, m)
    tab = search_mod._tables(b, n, m)
    chans = np.stack([rng.permutation(16)[: b * m] for _ in range(3)])
    got = ev.block_scores(chans, tab)
    for blk in range(3):
        for p in rng.choice(len(tab.parts), size=12, replace=False):
            cols = chans[blk][tab.subsets[tab.parts[p]].ravel()]
            assert got[blk, p] == pytest.approx(_kept_loops(s[:, cols], n, m), rel=1e-5)


def test_insertion_gains_match_brute_force() -> None:
    rng = np.random.default_rng(7)
    s = rng.random((5, 12))
    ev = search_mod._Evaluator(np.ascontiguousarray(s.T, dtype=np.float32), 2, 4)
    rest = np.array([[0, 1, 2], [3, 4, 5]])
    chans = np.array([6, 7, 8])
    got = ev.insertion_gains(rest, chans)
    for g in range(2):
        for c in range(3):
            cols = [*rest[g], chans[c]]
            assert got[g, c] == pytest.approx(_kept_loops(s[:, cols], 2, 4), rel=1e-5)


# --------------------------------------------------------------------------- search


@pytest.mark.parametrize(
    "make",
    [
        lambda rng: rng.random((32, 64)),
        lambda rng: np.abs(rng.standard_normal((48, 32))),
        lambda rng: np.abs(rng.standard_normal((8, 128))) * (rng.random(128) < 0.3),  # dead inputs
        lambda rng: np.sort(rng.random((16, 32)), axis=1),  # structured columns
    ],
)
def test_result_is_valid_and_never_worse(make) -> None:
    s = make(np.random.default_rng(8))
    result = search_permutation(s, time_budget_s=0.3)
    assert _is_permutation(result.perm, s.shape[1])
    assert result.kept_after >= result.kept_before
    assert result.kept_after == pytest.approx(kept_score_24(s[:, result.perm]), rel=1e-12)
    assert result.kept_after <= result.upper_bound * (1 + 1e-12)
    assert result.efficacy == pytest.approx(
        (result.kept_after - result.kept_before) / (result.upper_bound - result.kept_before)
    )
    assert result.efficacy > 0.0


@pytest.mark.parametrize(("rows", "c"), [(64, 64), (32, 128)])
def test_recovers_planted_grouping(rows: int, c: int) -> None:
    s = _planted(rows, c, seed=rows + c)
    result = search_permutation(s, time_budget_s=2.0, seed=1)
    assert result.efficacy >= 0.95
    # reaching the bound is detected and ends the search early
    if result.kept_after >= result.upper_bound * (1 - 1e-12):
        assert result.seconds < 1.5


def test_asp_reference_problem_beats_asp_stripe_groups() -> None:
    # ASP's optimize_stripe_groups,8 reaches 35.5% on this matrix (60 s on CPU); a few hundred
    # steps (well under a second) must already beat it. The step cap makes this test immune to
    # machine load.
    s = _asp_reference_matrix()
    result = search_permutation(s, time_budget_s=60.0, max_iterations=300)
    assert result.iterations == 300
    assert result.efficacy >= 0.355


def test_deterministic_given_seed_and_steps() -> None:
    s = np.random.default_rng(9).random((64, 64))
    a = search_permutation(s, time_budget_s=60.0, seed=3, max_iterations=150)
    b = search_permutation(s, time_budget_s=60.0, seed=3, max_iterations=150)
    assert np.array_equal(a.perm, b.perm)
    assert a.kept_after == b.kept_after
    assert a.iterations == b.iterations


@pytest.mark.parametrize(("shape", "budget"), [((128, 64), 0.2), ((512, 512), 0.3)])
def test_time_budget_respected(shape: tuple[int, int], budget: float) -> None:
    s = np.abs(np.random.default_rng(10).standard_normal(shape))
    t0 = time.perf_counter()
    result = search_permutation(s, time_budget_s=budget)
    wall = time.perf_counter() - t0
    assert wall <= budget + 0.3
    assert result.seconds <= wall
    assert result.kept_after > result.kept_before  # it did use the budget


def test_zero_budget_returns_identity_or_better() -> None:
    s = np.random.default_rng(11).random((16, 32))
    result = search_permutation(s, time_budget_s=0.0)
    assert _is_permutation(result.perm, 32)
    assert result.kept_after >= result.kept_before


@pytest.mark.parametrize(("n", "m"), [(1, 4), (2, 8)])
def test_other_nm_patterns(n: int, m: int) -> None:
    s = np.random.default_rng(12).random((16, 32))
    # A step cap, not the clock, ends this search: the first 2:8 call builds its move tables,
    # which on a slow machine can eat a short budget.
    result = search_permutation(s, time_budget_s=60.0, n=n, m=m, max_iterations=40)
    assert _is_permutation(result.perm, 32)
    assert result.kept_before == pytest.approx(kept_score(s, n, m))
    assert result.kept_after == pytest.approx(kept_score(s[:, result.perm], n, m))
    assert result.kept_after > result.kept_before


def test_nothing_to_gain_returns_identity() -> None:
    one_group = np.random.default_rng(13).random((5, 4))
    r = search_permutation(one_group)
    assert np.array_equal(r.perm, np.arange(4)) and r.efficacy == 0.0 and r.iterations == 0
    zeros = np.zeros((3, 16))
    r = search_permutation(zeros)
    assert np.array_equal(r.perm, np.arange(16)) and r.kept_after == 0.0
    # already 2:4-compatible: two nonzeros per group, the bound is met by the identity
    s = np.tile([1.0, 2.0, 0.0, 0.0], (4, 4))
    r = search_permutation(s)
    assert np.array_equal(r.perm, np.arange(16)) and r.efficacy == 0.0


# --------------------------------------------------------------------------- layouts and helpers


def test_conv_permutation_acts_on_cin_at_every_tap() -> None:
    rng = np.random.default_rng(14)
    w = rng.standard_normal((8, 16, 3, 3))  # ONNX conv [Cout, Cin, kh, kw]
    s = channel_blocks(np.abs(w), channel_axis=1)
    assert s.shape == (8 * 3 * 3, 16)
    # row (cout, kh, kw) holds that tap's input channels in order
    assert np.array_equal(s[(2 * 3 + 1) * 3 + 2], np.abs(w[2, :, 1, 2]))
    result = search_permutation(s, time_budget_s=0.3)
    permuted = w[:, result.perm]  # reorder Cin identically at every tap
    assert kept_score_24(channel_blocks(np.abs(permuted), channel_axis=1)) == pytest.approx(
        result.kept_after
    )
    # ONNX MatMul(X, W[K, N]): K is axis 0
    wk = rng.standard_normal((32, 6))
    assert np.array_equal(channel_blocks(wk, channel_axis=0), wk.T)


def test_invert_permutation_round_trip() -> None:
    rng = np.random.default_rng(15)
    p = rng.permutation(24)
    inv = invert_permutation(p)
    assert np.array_equal(inv[p], np.arange(24))
    x = rng.random((3, 24))
    assert np.array_equal(x[:, p][:, inv], x)
    with pytest.raises(PermutationInputError):
        invert_permutation([0, 2, 2])


@pytest.mark.parametrize(
    ("scores", "kwargs", "error"),
    [
        (np.ones((4, 10)), {}, PermutationInputError),  # C % 4 != 0
        (np.ones(16), {}, PermutationInputError),  # 1-D
        (-np.ones((4, 16)), {}, PermutationInputError),  # negative
        (np.full((4, 16), np.nan), {}, PermutationInputError),
        (np.ones((4, 16)), {"n": 4, "m": 4}, PermutationUsageError),
        (np.ones((4, 16)), {"n": 0, "m": 4}, PermutationUsageError),
        (np.ones((4, 16)), {"time_budget_s": -1.0}, PermutationUsageError),
        (np.ones((4, 16)), {"max_iterations": -5}, PermutationUsageError),
    ],
)
def test_bad_input_raises_user_facing_errors(scores, kwargs, error) -> None:
    with pytest.raises(error) as info:
        search_permutation(scores, **kwargs)
    assert isinstance(info.value, MpcompileError)
    assert str(info.value)


def test_partition_counts() -> None:
    # 8 channels into two groups of 4: C(8,4)/2; 12 into three: 12!/(4!^3 3!)
    assert search_mod._n_partitions(2, 4) == 35 == len(list(itertools.combinations(range(7), 3)))
    assert search_mod._n_partitions(3, 4) == 5775


def test_parallel_searches_return_every_key_with_a_valid_improving_permutation():
    from mpcompile.numerics.permutation import search_permutations

    rng = np.random.default_rng(5)
    problems = {f"layer{i}": np.abs(rng.standard_normal((32 + 8 * i, 64))) for i in range(5)}
    seen: list[str] = []
    results = search_permutations(problems, time_budget_s=0.2, seed=0, workers=2, on_done=seen.append)
    assert list(results) == list(problems) and sorted(seen) == sorted(problems)
    for key, result in results.items():
        assert sorted(result.perm.tolist()) == list(range(64))  # a permutation of the channels
        assert result.kept_after >= result.kept_before
        assert result.kept_after == pytest.approx(kept_score(problems[key][:, result.perm], 2, 4))
