"""MP law and BEMA fit on matrices with known ground truth."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate

from mpcompile.numerics.budget import seb_weights
from mpcompile.numerics.mp_law import fit_mp, mp_cdf, mp_density, mp_quantiles


@pytest.mark.parametrize("gamma", [0.1, 0.5, 1.0])
def test_cdf_matches_numerical_integral(gamma):
    lo, hi = (1 - np.sqrt(gamma)) ** 2, (1 + np.sqrt(gamma)) ** 2
    for x in np.linspace(lo, hi, 9)[1:-1]:
        expected, _ = integrate.quad(lambda t: mp_density(np.array([t]), gamma)[0], lo, x, limit=200)
        assert mp_cdf(x, gamma) == pytest.approx(expected, abs=1e-6)
    assert mp_cdf(hi + 1, gamma) == 1.0 and mp_cdf(lo / 2 if lo > 0 else -1, gamma) == 0.0


def test_quantiles_invert_cdf():
    levels = np.linspace(0.01, 0.99, 50)
    for gamma in (0.05, 0.3, 1.0):
        np.testing.assert_allclose(mp_cdf(mp_quantiles(levels, gamma), gamma), levels, atol=1e-6)


def test_sigma2_recovered_within_1_percent_on_768x3072():
    rng = np.random.default_rng(0)
    variance = 0.02**2
    fit = fit_mp(rng.normal(0.0, 0.02, size=(768, 3072)))
    assert abs(fit.sigma2 / variance - 1) < 0.01
    assert fit.spikes == 0
    assert fit.bulk_fraction > 0.99
    assert fit.fit_error < 0.02


@pytest.mark.parametrize("gamma", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("wide", [True, False])
def test_sigma2_within_2_percent_across_aspect_ratios_and_orientations(gamma, wide):
    rng = np.random.default_rng(1)
    n = 1200
    p = int(round(gamma * n))
    shape = (p, n) if wide else (n, p)
    std = 0.7
    fit = fit_mp(rng.normal(0.0, std, size=shape))
    assert fit.gamma == pytest.approx(p / n)
    assert abs(fit.sigma2 / std**2 - 1) < 0.02
    # σ+ = √v (√n + √p) for iid entries
    assert fit.sigma_plus == pytest.approx(std * (np.sqrt(n) + np.sqrt(p)), rel=0.02)


@pytest.mark.parametrize("shape", [(768, 3072), (3072, 768), (500, 500)])
def test_planted_spikes_counted_exactly(shape):
    rng = np.random.default_rng(2)
    m, n = shape
    v = 1.0
    noise = rng.normal(0.0, np.sqrt(v), size=shape)
    p, big = min(shape), max(shape)
    edge = np.sqrt(v) * (np.sqrt(big) + np.sqrt(p))
    k = 6
    strengths = edge * np.linspace(2.0, 4.0, k)  # far above the BBP threshold (≈ edge·(γ^{1/4}) scale)
    u = np.linalg.qr(rng.normal(size=(m, k)))[0]
    w = np.linalg.qr(rng.normal(size=(n, k)))[0]
    fit = fit_mp(noise + (u * strengths) @ w.T)
    assert fit.spikes == k
    assert fit.sigma_plus == pytest.approx(edge, rel=0.02)
    assert abs(fit.sigma2 / v - 1) < 0.02


def test_pure_noise_reports_no_spikes_over_seeds():
    """The Tracy–Widom margin (99 %) keeps pure noise from reporting spikes on most seeds."""
    seeds = range(20)
    with_margin = sum(fit_mp(np.random.default_rng(s).normal(size=(256, 1024))).spikes == 0 for s in seeds)
    plain = sum(
        fit_mp(np.random.default_rng(s).normal(size=(256, 1024)), tw_confidence=None).spikes == 0
        for s in seeds
    )
    assert with_margin >= 17
    assert with_margin >= plain


def test_orientation_does_not_change_fit():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(300, 900))
    a, b = fit_mp(w), fit_mp(w.T)
    assert a.sigma2 == pytest.approx(b.sigma2, rel=1e-9)
    assert a.sigma_plus == pytest.approx(b.sigma_plus, rel=1e-9)


def test_zero_matrix_does_not_crash():
    fit = fit_mp(np.zeros((32, 64)))
    assert fit.sigma2 == 0.0 and fit.spikes == 0


def test_seb_weights_follow_sigma_plus():
    seb = seb_weights(np.array([1.0, 2.0, 3.0]), sparsity=0.5, beta=1.25, s_d=0.7)
    np.testing.assert_allclose(seb.z, [-1.2247449, 0.0, 1.2247449], rtol=1e-6)
    decay = 1 - 0.5 / 0.7
    np.testing.assert_allclose(seb.weight, np.maximum(0.1, 1 + 1.25 * decay * seb.z))
    assert seb.weight[2] > seb.weight[1] > seb.weight[0]
    flat = seb_weights(np.array([2.0, 2.0]))
    np.testing.assert_array_equal(flat.weight, [1.0, 1.0])


def test_fit_keeps_the_top_singular_values_that_spectrum_change_reuses():
    from mpcompile.numerics.spectrum_change import spectrum_change

    rng = np.random.default_rng(11)
    w = rng.standard_normal((96, 256)).astype(np.float32)
    w[:, :3] *= 6.0  # a few spikes
    fit = fit_mp(w)
    exact = np.linalg.svd(w.astype(np.float64), compute_uv=False)[:8]
    np.testing.assert_allclose(fit.top_singular_values, exact, rtol=1e-5)
    assert "top_singular_values" not in fit.to_dict()  # the report schema is unchanged
    sparse = w.copy()
    sparse[:, 1::2] = 0.0
    perm = rng.permutation(256)  # channel permutations leave singular values as they are
    reused = spectrum_change(w[:, perm], sparse[:, perm], dense_top=fit.top_singular_values)
    solved = spectrum_change(w, sparse)
    assert reused["top_k_within_5pct"] == solved["top_k_within_5pct"]
    for key in ("relative_spectral_error", "relative_frobenius_error"):
        assert reused[key] == pytest.approx(solved[key], rel=1e-5)
