"""Seed methods on planted low-rank-plus-noise matrices with known signal directions."""

from __future__ import annotations

import numpy as np
import pytest

from mpcompile.numerics.mp_law import fit_mp
from mpcompile.numerics.spectral_prune import (
    magnitude_prune,
    rmt_layer_fractions,
    rmt_sv_prune,
    spectral_sample_prune,
)


def _planted(m=256, n=512, k=4, seed=0):
    rng = np.random.default_rng(seed)
    edge = np.sqrt(m) + np.sqrt(n)
    u = np.linalg.qr(rng.normal(size=(m, k)))[0]
    v = np.linalg.qr(rng.normal(size=(n, k)))[0]
    return rng.normal(size=(m, n)) + (u * edge * np.array([3.0, 4.0, 5.0, 6.0][:k])) @ v.T, k


def test_rmt_sv_keeps_singular_values_above_edge_within_5_percent():
    w, k = _planted()
    fit = fit_mp(w)
    result = rmt_sv_prune(w, 0.35, fit=fit)
    assert result.removed_fraction >= 0.30
    s = np.linalg.svd(w, compute_uv=False)
    s_pruned = np.linalg.svd(result.weight, compute_uv=False)
    above = s > fit.sigma_plus
    assert above.sum() == k
    np.testing.assert_array_less(np.abs(s_pruned[above] - s[above]) / s[above], 0.05)


def test_spectral_sample_preserves_dominant_singular_values_better_than_magnitude():
    w, k = _planted()
    s = np.linalg.svd(w, compute_uv=False)[:k]
    for fraction in (0.3, 0.5):
        errs = {}
        for name, result in (("magnitude", magnitude_prune(w, fraction)), ("spectral", spectral_sample_prune(w, fraction))):
            assert result.removed_fraction == pytest.approx(fraction, abs=1e-3)
            errs[name] = np.abs(np.linalg.svd(result.weight, compute_uv=False)[:k] - s) / s
        assert errs["spectral"].mean() < errs["magnitude"].mean()


def test_rmt_layer_fractions_follow_randomness_and_hit_the_target():
    rng = np.random.default_rng(0)
    noise = fit_mp(rng.normal(size=(128, 256)))
    signal, _ = _planted(128, 256, 4)
    structured = fit_mp(signal + 10 * np.outer(rng.normal(size=128), rng.normal(size=256)))
    fractions = rmt_layer_fractions([noise, structured], target=0.4)
    sizes = np.array([128 * 256, 128 * 256])
    assert np.dot(fractions, sizes) / sizes.sum() == pytest.approx(0.4, abs=1e-6)
    assert fractions[0] > fractions[1]
