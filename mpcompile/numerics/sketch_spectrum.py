"""A cheap MP fit for big matrices: bulk from a row sample, spikes from a randomized top-k.

Why: the exact fit solves the full p×p Gram eigenproblem, ~12 s for p = 4096 on one core,
which is ~45 min for the 224 matrices of a 7B decoder on two cores. The fit needs only two
things from the spectrum: the bulk quantiles (σ² by BEMA) and the few values above the edge.

* Bulk: the rows of the smaller side are a random sample of the matrix's rows. For a noise
  bulk of per-entry variance σ², ``m`` random rows of the ``p × n`` matrix have the MP(m/n, σ²)
  spectrum, same σ², so BEMA on an ``m × m`` Gram (m = 1024: 0.3 s) estimates σ²; the few
  spikes that land in the sample sit above the trimmed window. Measured error (README,
  ``benchmarks/scale_7b.py``): within 1 % on trained MiniLM layers sampled at m = p/4 and
  on the planted 4096-wide layers.
* Spikes: the top singular values of the full matrix from a randomized subspace iteration
  (Halko, Martinsson & Tropp 2011, alg. 4.4) with ``k`` columns; ``k`` doubles while every
  value found is a spike, and the exact fit takes over past ``p/4``.

Pure numpy; knows nothing of ONNX.
"""

from __future__ import annotations

import numpy as np

from mpcompile.numerics.mp_law import MPFit, fit_mp, fit_mp_from_eigenvalues, matrix_eigenvalues, tracy_widom_margin

__all__ = ["SKETCH_MIN_SIDE", "fit_mp_sketch", "top_singular_values"]

SKETCH_MIN_SIDE = 2048
"""Below this smaller side the exact fit is already cheap (p = 2048: ~1.5 s) and is used."""
SAMPLE_ROWS = 1024
TOP_K = 64
_OVERSAMPLE = 16
_POWER_ITERATIONS = 3


def top_singular_values(a: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """The ``k`` largest singular values of ``a`` (descending), randomized subspace iteration.

    With a spectral gap (the spikes over the bulk) three power iterations make the top values
    exact to float32 rounding; the tail of the ``k`` is biased low, which only under-counts
    values that sit at the bulk edge anyway.
    """
    rng = np.random.default_rng(seed)
    a = np.asarray(a, dtype=np.float32)
    width = min(k + _OVERSAMPLE, min(a.shape))
    q, _ = np.linalg.qr(a @ rng.standard_normal((a.shape[1], width), dtype=np.float32))
    for _ in range(_POWER_ITERATIONS):
        z, _ = np.linalg.qr(a.T @ q)
        q, _ = np.linalg.qr(a @ z)
    s = np.linalg.svd((q.T @ a).astype(np.float64), compute_uv=False)
    return s[:k]


def fit_mp_sketch(
    w: np.ndarray,
    *,
    alpha: float = 0.25,
    tw_confidence: float | None = 0.99,
    sample_rows: int = SAMPLE_ROWS,
    top_k: int = TOP_K,
    seed: int = 0,
    min_side: int = SKETCH_MIN_SIDE,
) -> MPFit:
    """The MP fit of ``w`` from a row sample and a top-k (see module doc).

    ``fit_error`` is the sample's (its central window against its own MP law); the fit has
    no full spectrum (``eigenvalues`` None, ``top_eigenvalues`` the values found), so code
    that needs the whole spectrum computes it. Matrices with a smaller side under ``min_side`` (or
under twice the sample) gain nothing and get the exact fit.
    """
    a = np.asarray(w)
    rows, cols = a.shape
    if min(rows, cols) < max(min_side, 2 * sample_rows):
        return fit_mp(a, alpha=alpha, tw_confidence=tw_confidence)
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float32)
    if rows > cols:
        a = a.T
    p, n = a.shape
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(p, size=sample_rows, replace=False))
    sample = fit_mp_from_eigenvalues(matrix_eigenvalues(a[picked]), sample_rows, n, alpha=alpha,
                                     tw_confidence=tw_confidence)
    sigma2 = sample.sigma2
    frob2 = float(np.einsum("ij,ij->", a, a, dtype=np.float64))
    gamma = p / n
    if not np.isfinite(frob2) or sigma2 <= 0.0 or frob2 <= 0.0:
        return fit_mp(a, alpha=alpha, tw_confidence=tw_confidence)
    lambda_plus = sigma2 * (1.0 + np.sqrt(gamma)) ** 2
    sigma_plus = float(np.sqrt(n * lambda_plus))
    margin = tracy_widom_margin(gamma, n, tw_confidence) if tw_confidence else 0.0
    spike_threshold = float(np.sqrt(n * sigma2 * ((1.0 + np.sqrt(gamma)) ** 2 + margin)))
    k = top_k
    while True:
        s = top_singular_values(a, k, seed=seed)
        # the smallest value found still above the edge: more may follow, look further
        if s[-1] <= sigma_plus:
            break
        if 2 * k > p // 4:
            return fit_mp(a, alpha=alpha, tw_confidence=tw_confidence)
        k *= 2
    spikes = s > spike_threshold
    top = float(s[0] ** 2)
    return MPFit(
        rows=int(rows),
        cols=int(cols),
        gamma=float(gamma),
        sigma2=float(sigma2),
        lambda_plus=float(lambda_plus),
        sigma_plus=sigma_plus,
        spike_threshold=spike_threshold,
        spikes=int(np.count_nonzero(spikes)),
        bulk_fraction=float(1.0 - np.count_nonzero(s > sigma_plus) / p),
        fit_error=sample.fit_error,
        spike_mass_ratio=float(np.sum(s[spikes] ** 2) / frob2),
        spectral_norm=float(s[0]),
        frobenius_norm=float(np.sqrt(frob2)),
        stable_rank=float(frob2 / top),
        top_singular_over_edge=float(s[0] / sigma_plus),
        eigenvalues=None,
        top_eigenvalues=(s**2)[::-1].copy(),
        spectrum="sketch",
    )
