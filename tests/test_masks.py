"""Tests for mpcompile.numerics.masks: N:M legality, optimality of CAST, and method quality.

The N:M checks here count nonzeros directly (``_group_counts``) instead of calling
``masks.is_nm_sparse``, so a bug in the module's own checker cannot hide a bad mask.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from mpcompile.errors import MpcompileError
from mpcompile.numerics import masks
from mpcompile.numerics.masks import (
    MASK_METHODS,
    LayerStats,
    apply_method,
    cast_24,
    cast_cost,
    is_nm_sparse,
    magnitude_24,
    nm_mask_magnitude,
    reconstruction_error,
    sparsegpt_24,
    wanda_24,
)

METHODS = sorted(MASK_METHODS)


def _group_counts(a: np.ndarray, m: int) -> np.ndarray:
    a = np.asarray(a)
    return (a != 0).reshape(a.shape[0], -1, m).sum(axis=-1)


def _correlated_data(seed: int, rows: int = 2048, k: int = 128, out: int = 64):
    """X = (Z @ A) · s: random mixing plus log-normal channel scales, like real layer inputs."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((rows, k))
    a = rng.standard_normal((k, k)) / np.sqrt(k)
    x = (z @ a) * np.exp(rng.standard_normal(k))
    w = rng.standard_normal((out, k))
    return x, w


@pytest.fixture(scope="module")
def calib():
    x, w = _correlated_data(0)
    return x, w, LayerStats.from_activations(x)


# --------------------------------------------------------------------------- LayerStats


def test_layer_stats_gram_and_merge():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 12)).astype(np.float32)
    st = LayerStats.from_activations(x)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(st.gram, x64.T @ x64 / 300, rtol=1e-12)
    assert st.rows == 300
    np.testing.assert_allclose(st.col_sq_norm, (x64**2).mean(axis=0), rtol=1e-12)
    merged = LayerStats.from_activations(x[:100]).merged(LayerStats.from_activations(x[100:]))
    assert merged.rows == 300
    np.testing.assert_allclose(merged.gram, st.gram, rtol=1e-12)
    # leading axes are rows
    st3 = LayerStats.from_activations(x.reshape(3, 100, 12))
    np.testing.assert_allclose(st3.gram, st.gram, rtol=1e-12)


def test_compact_layer_stats_hold_half_and_give_back_the_same_matrix():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 36)) * rng.uniform(0.1, 10.0, size=36)  # unequal columns
    full = LayerStats.from_activations(x)
    compact = full.compact()
    assert compact._upper.size == 36 * 37 // 2 and compact._gram is None
    np.testing.assert_array_equal(compact.gram, full.gram)  # exact, both triangles
    np.testing.assert_array_equal(compact.diagonal(), np.diag(full.gram))
    np.testing.assert_array_equal(compact.expanded().gram, full.gram)
    idx = np.arange(36).reshape(9, 4)
    blocks = full.gram[idx[:, :, None], idx[:, None, :]]
    np.testing.assert_array_equal(compact.diagonal_blocks(4), blocks)  # read from the triangle
    np.testing.assert_array_equal(full.diagonal_blocks(4), blocks)
    assert compact.k == 36 and compact.rows == 500 and compact.has_gram
    np.testing.assert_allclose(compact.merged(full).gram, full.gram, rtol=1e-12)
    assert not LayerStats.data_free().compact().has_gram
    w = rng.standard_normal((16, 36))
    for method in ("cast", "wanda", "sparsegpt", "cast-obs"):  # masks cannot tell them apart
        np.testing.assert_array_equal(apply_method(method, w, compact).weight, apply_method(method, w, full).weight)


# --------------------------------------------------------------------------- legality


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_exact_2_4(method, dtype, calib):
    x, w, st = calib
    w = w.astype(dtype)
    # a row group that is already sparse: 3 zeros, and one with 4 zeros
    w[0, 0:3] = 0
    w[1, 4:8] = 0
    res = apply_method(method, w, st)
    assert res.mask.dtype == bool and res.mask.shape == w.shape
    # rule: the mask keeps exactly n per group, always
    assert np.all(res.mask.reshape(w.shape[0], -1, 4).sum(-1) == 2)
    # the weight obeys the TensorRT rule, with exact zeros wherever the mask drops
    assert res.weight.dtype == dtype and res.weight.shape == w.shape
    assert np.all(_group_counts(res.weight, 4) <= 2)
    assert np.all(res.weight[~res.mask] == 0)
    # the pre-zeroed group cannot gain nonzeros, except under admm's whole-row least-squares
    # re-fit, which may use the kept zero slot (still within the 2 of the rule, checked above)
    assert _group_counts(res.weight, 4)[0, 0] <= 1 or method == "admm"
    updates = method in ("sparsegpt", "cast-obs", "admm")  # OBS / least-squares methods re-fit kept weights
    assert _group_counts(res.weight, 4)[1, 1] == 0 or updates
    if not updates:
        np.testing.assert_array_equal(res.weight, np.where(res.mask, w, 0).astype(dtype))
    else:
        assert not np.array_equal(res.weight[res.mask], w[res.mask])  # OBS moved kept weights
    a = np.abs(w.astype(np.float64))
    assert res.kept_magnitude_fraction == pytest.approx(a[res.mask].sum() / a.sum(), rel=1e-12)
    assert 0.5 < res.kept_magnitude_fraction < 1.0
    assert res.method == method
    assert is_nm_sparse(res.weight)


@pytest.mark.parametrize("n,m", [(1, 4), (4, 8), (2, 8), (3, 8)])
@pytest.mark.parametrize("method", METHODS)
def test_generic_nm(method, n, m):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((512, 64)) @ rng.standard_normal((64, 64))
    w = rng.standard_normal((16, 64)).astype(np.float32)
    kw = {"blocksize": 32} if method == "sparsegpt" else {}
    res = apply_method(method, w, LayerStats.from_activations(x), n=n, m=m, **kw)
    assert np.all(res.mask.reshape(16, -1, m).sum(-1) == n)
    assert np.all(_group_counts(res.weight, m) <= n)
    assert np.all(res.weight[~res.mask] == 0)


def test_magnitude_keeps_largest_generic():
    w = np.array([[0.1, -5.0, 3.0, 0.2, 1.0, 2.0, -3.0, 4.0]])
    np.testing.assert_array_equal(
        nm_mask_magnitude(w, 1, 4), [[False, True, False, False, False, False, False, True]]
    )
    np.testing.assert_array_equal(
        nm_mask_magnitude(w, 3, 4), [[False, True, True, True, False, True, True, True]]
    )
    np.testing.assert_array_equal(
        nm_mask_magnitude(w, 4, 8), [[False, True, True, False, False, False, True, True]]
    )


# --------------------------------------------------------------------------- CAST


def test_cast_is_exact_minimiser():
    rng = np.random.default_rng(3)
    k, out = 16, 8
    # strongly correlated inputs so the covariance, not magnitude, decides many groups
    x = rng.standard_normal((1000, 6)) @ rng.standard_normal((6, k))
    x += 0.2 * rng.standard_normal((1000, k))
    st = LayerStats.from_activations(x)
    w = rng.standard_normal((out, k))
    res = cast_24(w, st)
    gram = st.gram
    patterns = list(itertools.combinations(range(4), 2))
    n_differs_from_magnitude = 0
    mag = nm_mask_magnitude(w)
    for i in range(out):
        for g in range(k // 4):
            cols = list(range(4 * g, 4 * g + 4))
            c = gram[np.ix_(cols, cols)]
            costs = []
            for pat in patterns:
                r = np.array([0.0 if j in pat else w[i, cols[j]] for j in range(4)])
                costs.append(float(r @ c @ r))
            chosen = res.mask[i, cols]
            r = np.where(chosen, 0.0, w[i, cols])
            assert chosen.sum() == 2
            assert float(r @ c @ r) == pytest.approx(min(costs), rel=1e-9, abs=1e-12)
            n_differs_from_magnitude += not np.array_equal(chosen, mag[i, cols])
    assert n_differs_from_magnitude >= 3  # the case really exercises the covariance


def test_cast_without_data_equals_magnitude():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((32, 64)).astype(np.float16)
    ref = magnitude_24(w)
    for stats in (None, LayerStats.data_free()):
        res = cast_24(w, stats)
        np.testing.assert_array_equal(res.mask, ref.mask)
        np.testing.assert_array_equal(res.weight, ref.weight)
        assert res.calibrated is False
    # an all-zero gram makes every pattern free: ties are broken by magnitude, not arbitrarily
    zero = LayerStats(gram=np.zeros((64, 64)), rows=10)
    np.testing.assert_array_equal(cast_24(w, zero).mask, ref.mask)


def test_cast_minimises_its_proxy(calib):
    x, w, st = calib
    costs = {name: cast_cost(w, apply_method(name, w, st).mask, st) for name in METHODS}
    errs = {name: reconstruction_error(w, apply_method(name, w, st).weight, st) for name in METHODS}
    print("\nper-group proxy Σ rᵀC_g r:", {k: round(v, 2) for k, v in costs.items()})
    print("relative output MSE:", {k: round(v, 5) for k, v in errs.items()})
    # per-group optimality => no mask on the same weight can do better on the proxy
    assert costs["cast"] <= costs["wanda"] + 1e-9 * costs["wanda"]
    assert costs["cast"] < 0.5 * costs["magnitude"]
    assert errs["cast"] < 0.5 * errs["magnitude"]


def test_cast_speed_vit_mlp():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((768, 768))
    st = LayerStats(gram=a @ a.T / 768, rows=4096)
    w = rng.standard_normal((3072, 768)).astype(np.float32)
    cast_24(w[:8], st)  # warm-up (pattern table, BLAS threads)
    t0 = time.perf_counter()
    res = cast_24(w, st)
    dt = time.perf_counter() - t0
    print(f"\nCAST 2:4 on 3072x768 with 768x768 gram: {dt:.3f} s")
    assert np.all(res.mask.reshape(3072, -1, 4).sum(-1) == 2)
    assert dt < 5.0  # ~0.1 s measured; generous for shared CI cores


# --------------------------------------------------------------------------- Wanda


def test_wanda_uses_column_norms():
    # column 0 has the largest weight but a nearly silent input
    x = np.array([[0.1, 1.0, 1.0, 1.0], [-0.1, -1.0, 1.0, -1.0]])
    w = np.array([[1.0, 0.9, 0.5, 0.1]])
    res = wanda_24(w, LayerStats.from_activations(x))
    np.testing.assert_array_equal(res.mask, [[False, True, True, False]])
    np.testing.assert_array_equal(magnitude_24(w).mask, [[True, True, False, False]])


# --------------------------------------------------------------------------- SparseGPT


def _sparsegpt_reference(w, gram, n, m, damp, blocksize):
    """Literal numpy transcription of IST-DASLab SparseGPT.fasterprune (N:M branch)."""
    w = w.astype(np.float64).copy()
    h = gram.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h[np.diag_indices_from(h)] += damp * np.mean(np.diag(h))
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper Cholesky of H^-1
    prunen = m - n
    for i1 in range(0, w.shape[1], blocksize):
        i2 = min(i1 + blocksize, w.shape[1])
        w1 = w[:, i1:i2].copy()
        q1 = np.zeros_like(w1)
        err1 = np.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        mask1 = np.zeros_like(w1, dtype=bool)
        for i in range(i2 - i1):
            col = w1[:, i]
            d = h1[i, i]
            if i % m == 0:
                tmp = w1[:, i : i + m] ** 2 / (np.diag(h1)[i : i + m].reshape(1, -1)) ** 2
                idx = np.argsort(tmp, axis=1, kind="stable")[:, :prunen]
                np.put_along_axis(mask1[:, i : i + m], idx, True, axis=1)
            q = col.copy()
            q[mask1[:, i]] = 0
            q1[:, i] = q
            e = (col - q) / d
            w1[:, i:] -= np.outer(e, h1[i, i:])
            err1[:, i] = e
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w


@pytest.mark.parametrize("n,m,blocksize", [(2, 4, 16), (1, 4, 8), (4, 8, 32)])
def test_sparsegpt_matches_reference_algorithm(n, m, blocksize):
    x, w = _correlated_data(6, rows=512, k=64, out=24)
    st = LayerStats.from_activations(x)
    res = sparsegpt_24(w, st, n=n, m=m, blocksize=blocksize)
    ref = _sparsegpt_reference(w, st.gram, n, m, 0.01, blocksize)
    np.testing.assert_allclose(res.weight, ref, rtol=1e-8, atol=1e-10)
    np.testing.assert_array_equal(res.weight == 0, ref == 0)
    # the lazy block size is an implementation detail: the result does not depend on it
    other = sparsegpt_24(w, st, n=n, m=m, blocksize=64)
    np.testing.assert_allclose(other.weight, res.weight, rtol=1e-8, atol=1e-10)


def test_sparsegpt_without_data_is_magnitude_and_dead_columns_are_zeroed():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((8, 16)).astype(np.float32)
    res = sparsegpt_24(w, None)
    np.testing.assert_array_equal(res.mask, magnitude_24(w).mask)
    assert res.calibrated is False
    x = rng.standard_normal((200, 16))
    x[:, 5] = 0.0  # a dead input channel: its weights are irrelevant and get dropped
    res = sparsegpt_24(w, LayerStats.from_activations(x))
    assert np.all(res.weight[:, 5] == 0)
    assert np.all(res.mask.reshape(8, -1, 4).sum(-1) == 2)


def test_quality_order_on_correlated_calibration(calib):
    x, w, st = calib
    err = {name: reconstruction_error(w, apply_method(name, w, st).weight, st) for name in METHODS}
    print("\nrelative output MSE (2048x128, out=64):", {k: round(v, 5) for k, v in err.items()})
    assert err["sparsegpt"] < 0.8 * err["wanda"]
    assert err["wanda"] < 0.5 * err["magnitude"]
    # reconstruction_error is the true relative output MSE on the calibration rows
    ws = apply_method("sparsegpt", w, st).weight
    direct = np.sum((x @ (w - ws).T) ** 2) / np.sum((x @ w.T) ** 2)
    assert err["sparsegpt"] == pytest.approx(direct, rel=1e-9)


def test_reconstruction_error_bounds():
    x, w = _correlated_data(8, rows=256, k=32, out=8)
    st = LayerStats.from_activations(x)
    assert reconstruction_error(w, w, st) == 0.0
    assert reconstruction_error(w, np.zeros_like(w), st) == pytest.approx(1.0)
    assert reconstruction_error(w, 0.5 * w, None) == pytest.approx(0.25)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("method", METHODS)
def test_k_not_multiple_of_m_raises(method):
    w = np.ones((4, 10), dtype=np.float32)
    st = LayerStats.from_activations(np.ones((5, 10)))
    with pytest.raises(ValueError, match="multiple of m=4"):
        apply_method(method, w, st)
    with pytest.raises(MpcompileError):
        apply_method(method, w, st)


def test_bad_options_raise():
    w = np.ones((4, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="multiple of m=4"):
        nm_mask_magnitude(np.ones((2, 6)))
    with pytest.raises(MpcompileError, match="unknown mask method"):
        apply_method("random", w, None)
    with pytest.raises(ValueError, match="blocksize"):
        sparsegpt_24(w, LayerStats.from_activations(np.ones((3, 8))), blocksize=6)
    with pytest.raises(ValueError, match="0 < n < m"):
        magnitude_24(w, n=4, m=4)
    with pytest.raises(ValueError, match="gram has shape"):
        cast_24(w, LayerStats.from_activations(np.ones((3, 4))))
    with pytest.raises(ValueError, match="NaN"):
        magnitude_24(np.full((2, 4), np.nan))
    with pytest.raises(ValueError, match="dtype"):
        magnitude_24(np.ones((2, 4), dtype=np.int32))
    assert masks.nm_patterns(2, 4).shape == (6, 4)


def test_cast_obs_picks_the_exact_best_refit_pattern_on_one_group():
    """With K = m the joint OBS pattern must equal brute force over patterns with optimal re-fit."""
    import itertools

    from mpcompile.numerics.masks import cast_obs_24

    rng = np.random.default_rng(7)
    x = rng.normal(size=(512, 4)) @ rng.normal(size=(4, 4))
    stats = LayerStats.from_activations(x)
    w = rng.normal(size=(32, 4))
    result = cast_obs_24(w, stats, damp=0.0)
    h = stats.gram
    for row in range(w.shape[0]):
        best, best_cost = None, np.inf
        for kept in itertools.combinations(range(4), 2):
            kept = list(kept)
            pruned = [j for j in range(4) if j not in kept]
            # optimal kept values: minimise (w - v)ᵀ H (w - v) with v zero on pruned
            v = np.zeros(4)
            v[kept] = w[row, kept] + np.linalg.solve(h[np.ix_(kept, kept)], h[np.ix_(kept, pruned)] @ w[row, pruned])
            cost = (w[row] - v) @ h @ (w[row] - v)
            if cost < best_cost - 1e-12:
                best, best_cost, best_v = kept, cost, v
        assert sorted(np.flatnonzero(result.mask[row])) == best
        # compensation flows forward only (as in SparseGPT), so the kept values are at most as
        # good as the full re-fit, and never worse than no update at all
        got = (w[row] - result.weight[row]) @ h @ (w[row] - result.weight[row])
        plain = np.where(result.mask[row], w[row], 0.0)
        assert best_cost - 1e-9 <= got <= (w[row] - plain) @ h @ (w[row] - plain) + 1e-9


def test_cast_obs_reconstructs_better_than_cast():
    from mpcompile.numerics.masks import cast_obs_24

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(2048, 128)) @ rng.normal(size=(128, 128))) * np.exp(rng.normal(size=128))
    stats = LayerStats.from_activations(x)
    w = rng.normal(size=(64, 128))
    obs = cast_obs_24(w, stats)
    assert (obs.mask.reshape(64, -1, 4).sum(axis=2) == 2).all()
    assert reconstruction_error(w, obs.weight, stats) < 0.8 * reconstruction_error(w, cast_24(w, stats).weight, stats)


def test_sparsegpt_raises_the_damping_until_the_hessian_factorises(caplog):
    # Positive diagonal, indefinite: fails at damping 0.5·mean(diag), factorises at 5·mean(diag).
    k = 8
    gram = np.eye(k) + 2.0 * np.kron(np.eye(k // 2), np.array([[0.0, 1.0], [1.0, 0.0]]))
    w = np.random.default_rng(3).standard_normal((6, k))
    with caplog.at_level("WARNING"):
        result = masks.sparsegpt_24(w, LayerStats(gram, rows=100), damp=0.5)
    assert "retrying" in caplog.text
    assert result.mask.reshape(6, -1, 4).sum(axis=2).tolist() == [[2, 2]] * 6
    hopeless = np.eye(k) + 1e6 * np.kron(np.eye(k // 2), np.array([[0.0, 1.0], [1.0, 0.0]]))
    with pytest.raises(MpcompileError, match="not positive definite"):
        masks.sparsegpt_24(w, LayerStats(hopeless, rows=100), damp=0.01)
