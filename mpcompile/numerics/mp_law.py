"""Marchenko–Pastur law and the BEMA bulk fit (pure numpy/scipy).

Why this module exists: the spectral-analysis pass needs, for every weight matrix, the
noise level σ² of its bulk and the bulk edge σ+ that separates signal (spikes) from
noise-like mass. The reference implementations root-find every quantile with
``scipy.optimize.brentq`` over a ``quad`` integral, which costs seconds per layer. Here the
unit MP CDF is tabulated once per aspect ratio on a cosine grid (which removes the square-
root singularities at both edges) and inverted by interpolation, so a fit costs one
symmetric eigendecomposition plus microseconds.

Conventions: ``W`` is ``M×N``; ``p = min(M, N)``, ``n = max(M, N)``, ``γ = p/n ≤ 1``.
Eigenvalues are ``λ = s²/n`` for singular values ``s``; for iid entries of variance ``v``
they follow MP(γ, σ² = v), whose upper edge ``λ+ = σ²(1+√γ)²`` maps back to the singular
value edge ``σ+ = √(n·λ+) = √v(√n + √p)``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = [
    "MPFit",
    "fit_mp",
    "fit_mp_from_eigenvalues",
    "matrix_eigenvalues",
    "symmetric_eigenvalues",
    "mp_cdf",
    "mp_density",
    "mp_quantiles",
    "tracy_widom_margin",
]

logger = logging.getLogger(__name__)

_GRID_POINTS = 4097
# Upper quantiles of the Tracy–Widom (β=1) law, the fluctuation law of the largest noise
# eigenvalue. Values from Bornemann (2010), Table 4 / Tracy & Widom (1996).
_TW1_QUANTILES = {0.90: 0.4501, 0.95: 0.9793, 0.99: 2.0234}


def _edges(gamma: float) -> tuple[float, float]:
    root = np.sqrt(gamma)
    return (1.0 - root) ** 2, (1.0 + root) ** 2


def _check_gamma(gamma: float) -> float:
    gamma = float(gamma)
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"aspect ratio γ must be in (0, 1], got {gamma}")
    return gamma


def mp_density(x: np.ndarray, gamma: float) -> np.ndarray:
    """Density of the unit-variance MP law with ratio γ ≤ 1 (no atom at 0 for γ ≤ 1)."""
    gamma = _check_gamma(gamma)
    lo, hi = _edges(gamma)
    x = np.asarray(x, dtype=np.float64)
    inside = (x > lo) & (x < hi)
    out = np.zeros_like(x)
    xi = x[inside]
    out[inside] = np.sqrt((hi - xi) * (xi - lo)) / (2.0 * np.pi * gamma * xi)
    return out


@functools.lru_cache(maxsize=256)
def _cdf_table(gamma_key: float) -> tuple[np.ndarray, np.ndarray]:
    """Tabulate the unit MP CDF on x = lo + (hi-lo)(1-cos θ)/2, θ ∈ [0, π].

    Under this substitution the integrand f(x)·dx/dθ is smooth at both edges (even for
    γ = 1 where the density diverges like x^{-1/2}), so a cumulative trapezoid on a
    uniform θ grid is accurate to ~1e-7.
    """
    gamma = gamma_key
    lo, hi = _edges(gamma)
    theta = np.linspace(0.0, np.pi, _GRID_POINTS)
    x = lo + (hi - lo) * (1.0 - np.cos(theta)) / 2.0
    dx_dtheta = (hi - lo) * np.sin(theta) / 2.0
    # f(x)·dx/dθ written without the edge cancellation: sqrt((hi-x)(x-lo)) = (hi-lo)/2·sin θ.
    integrand = ((hi - lo) / 2.0 * np.sin(theta)) * dx_dtheta / (2.0 * np.pi * gamma * np.maximum(x, 1e-300))
    if lo == 0.0:
        # γ = 1: x→0 at θ=0; the limit of the integrand is finite, take it from the neighbour.
        integrand[0] = integrand[1]
    steps = 0.5 * (integrand[1:] + integrand[:-1]) * np.diff(theta)
    cdf = np.concatenate([[0.0], np.cumsum(steps)])
    cdf /= cdf[-1]
    return x, cdf


def _gamma_key(gamma: float) -> float:
    return round(_check_gamma(gamma), 9)


def mp_cdf(x: np.ndarray, gamma: float) -> np.ndarray:
    """CDF of the unit-variance MP law (0 below λ−, 1 above λ+)."""
    grid, cdf = _cdf_table(_gamma_key(gamma))
    return np.interp(np.asarray(x, dtype=np.float64), grid, cdf, left=0.0, right=1.0)


def mp_quantiles(levels: np.ndarray, gamma: float) -> np.ndarray:
    """Quantiles of the unit MP law at the given levels in [0, 1] (vectorised inverse CDF)."""
    grid, cdf = _cdf_table(_gamma_key(gamma))
    return np.interp(np.asarray(levels, dtype=np.float64), cdf, grid)


def tracy_widom_margin(gamma: float, n: int, confidence: float) -> float:
    """Relative widening of λ+ (unit σ²) at which pure noise exceeds the edge with prob 1-confidence.

    The largest noise eigenvalue fluctuates around λ+ on the scale
    ``n^{-2/3} γ^{-1/6} (1+√γ)^{4/3}`` (Johnstone 2001); counting only eigenvalues above
    the edge plus this margin stops pure noise from reporting a spike most of the time.
    """
    if confidence not in _TW1_QUANTILES:
        raise ValueError(f"confidence must be one of {sorted(_TW1_QUANTILES)}, got {confidence}")
    gamma = _check_gamma(gamma)
    scale = n ** (-2.0 / 3.0) * gamma ** (-1.0 / 6.0) * (1.0 + np.sqrt(gamma)) ** (4.0 / 3.0)
    return float(_TW1_QUANTILES[confidence] * scale)


@dataclass(frozen=True)
class MPFit:
    """Result of fitting the MP law to one matrix (all singular-value quantities in W's units).

    Attributes:
        rows, cols: shape of the matrix that was fitted.
        gamma: p/n ≤ 1.
        sigma2: fitted bulk variance per entry σ̂².
        lambda_plus: bulk edge of the eigenvalues λ = s²/n.
        sigma_plus: bulk edge in singular-value units, √(n·λ+).
        spike_threshold: singular value above which a value counts as a spike (σ+ widened
            by the Tracy–Widom margin when one is used).
        spikes: number of singular values above ``spike_threshold``.
        bulk_fraction: share of singular values ≤ σ+ (noise-like mass; higher = more prunable).
        fit_error: μ, L∞ distance between the fitted MP CDF and the empirical CDF on the
            central window (small = the bulk really is MP-like).
        spike_mass_ratio: Σ_{spikes} s² / Σ s².
        spectral_norm, frobenius_norm, stable_rank: ‖W‖₂, ‖W‖_F, ‖W‖_F²/‖W‖₂².
        top_singular_over_edge: s_max / σ+.
    """

    rows: int
    cols: int
    gamma: float
    sigma2: float
    lambda_plus: float
    sigma_plus: float
    spike_threshold: float
    spikes: int
    bulk_fraction: float
    fit_error: float
    spike_mass_ratio: float
    spectral_norm: float
    frobenius_norm: float
    stable_rank: float
    top_singular_over_edge: float
    eigenvalues: np.ndarray | None = field(default=None, repr=False, compare=False)
    """The fitted ``s²``, ascending (p floats): later stages (the spectrum change after pruning,
    the report's ESD plots) read the dense spectrum here instead of solving it again, or
    reading a weight that has been pruned since."""
    top_eigenvalues: np.ndarray | None = field(default=None, repr=False, compare=False)
    """A sketched fit (:mod:`mpcompile.numerics.sketch_spectrum`) has no full spectrum
    (``eigenvalues`` is None), only its top ``s²`` found, ascending."""
    spectrum: str = "exact"
    """``exact`` (full Gram eigenvalues) or ``sketch`` (row-sample bulk + randomized top-k)."""

    @property
    def top_singular_values(self) -> tuple[float, ...]:
        """The largest singular values (up to 8), largest first."""
        values = self.eigenvalues if self.eigenvalues is not None else self.top_eigenvalues
        if values is None:
            return ()
        return tuple(float(v) for v in np.sqrt(np.clip(values[::-1][:TOP_SINGULAR_KEPT], 0.0, None)))

    def to_dict(self) -> dict[str, float | int]:
        out = asdict(self)
        del out["eigenvalues"], out["top_eigenvalues"]
        return out


TOP_SINGULAR_KEPT = 8


def matrix_eigenvalues(w: np.ndarray) -> np.ndarray:
    """Ascending eigenvalues s² of the Gram matrix of W's smaller side (float64).

    The Gram + symmetric eigensolver costs p²n + p³/... flops against an SVD's larger
    constant, and we never need singular vectors here.
    """
    a = np.asarray(w)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {a.shape}")
    # float32 weights: a float32 product (half the memory traffic) accumulated by BLAS is
    # accurate to ~1e-7 relative on the Gram, far below the spread MP fits care about;
    # the small p×p eigenproblem is then solved in float64.
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float32)
    # Entries near float32's range (a corrupted or diverged weight, |w| ~ 1e19) overflow the
    # Gram to Inf and LAPACK fails: such a matrix is scaled to max |w| = 1 first.
    scale = float(np.max(np.abs(a))) if a.size else 0.0
    rescale = np.isfinite(scale) and scale > _GRAM_SAFE_MAX
    if rescale:
        a = a.astype(np.float64) / scale
    gram = (a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a).astype(np.float64)
    del a
    eig = symmetric_eigenvalues(gram)
    if rescale:
        eig = eig * scale**2
    return np.clip(eig, 0.0, None)


def symmetric_eigenvalues(gram: np.ndarray) -> np.ndarray:
    """Ascending eigenvalues of a symmetric float64 matrix; ``gram`` may be overwritten.

    Why not always ``np.linalg.eigvalsh``: its one-stage tridiagonal reduction is half BLAS-2
    (memory bound) and takes ~12 s at p = 4096, most of a 7B model's analysis. LAPACK's
    two-stage reduction (``dsyevd_2stage``, band form by BLAS-3 first) gives the same
    eigenvalues (to 1e-14 relative, tested) in ~60 % of the time. It is called from the
    OpenBLAS that numpy ships where that exports it; elsewhere eigvalsh is used.
    """
    p = gram.shape[0]
    solver = _two_stage_solver() if p >= _TWO_STAGE_MIN else None
    if solver is None:
        return np.linalg.eigvalsh(gram)
    a = np.require(gram, dtype=np.float64, requirements=["C", "W", "A"])
    out = np.empty(p, dtype=np.float64)
    info = solver(101, b"N", b"L", p, a.ctypes.data, p, out.ctypes.data)
    if info != 0:
        raise np.linalg.LinAlgError(f"dsyevd_2stage failed (info {info})")
    return out


_TWO_STAGE_MIN = 512


@functools.lru_cache(maxsize=1)
def _two_stage_solver():
    """``LAPACKE_dsyevd_2stage`` (ILP64) of numpy's bundled OpenBLAS, or None."""
    import ctypes
    import glob
    import os

    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "libscipy_openblas64_*"))
    for path in libs:
        try:
            func = getattr(ctypes.CDLL(path), "scipy_LAPACKE_dsyevd_2stage64_")
        except (OSError, AttributeError):
            continue
        func.restype = ctypes.c_int64
        func.argtypes = [ctypes.c_int, ctypes.c_char, ctypes.c_char, ctypes.c_int64, ctypes.c_void_p,
                         ctypes.c_int64, ctypes.c_void_p]
        return func
    return None


# Above this max |w| a float32 Gram of a wide matrix can overflow (1e15² × 1e8 terms ≈ 1e38).
_GRAM_SAFE_MAX = 1e15


def fit_mp(
    w: np.ndarray,
    *,
    alpha: float = 0.25,
    tw_confidence: float | None = 0.99,
) -> MPFit:
    """Fit the MP law to matrix ``w`` by BEMA (bulk eigenvalue matching).

    Args:
        w: the weight as a 2-D matrix (any orientation: the law is symmetric in M, N).
        alpha: the central window [αp, (1-α)p) of sorted eigenvalues used for the fit; it
            excludes spikes at the top and small outliers at the bottom.
        tw_confidence: None, 0.90, 0.95 or 0.99: widen the spike threshold by the
            Tracy–Widom quantile so that a pure-noise matrix rarely reports a spike.
    """
    rows, cols = np.shape(w)
    return fit_mp_from_eigenvalues(
        matrix_eigenvalues(w), rows, cols, alpha=alpha, tw_confidence=tw_confidence
    )


def fit_mp_from_eigenvalues(
    gram_eigenvalues: np.ndarray,
    rows: int,
    cols: int,
    *,
    alpha: float = 0.25,
    tw_confidence: float | None = 0.99,
) -> MPFit:
    """BEMA fit from the p eigenvalues s² of the smaller Gram matrix (any order)."""
    if not 0.0 <= alpha < 0.5:
        raise ValueError(f"alpha must be in [0, 0.5), got {alpha}")
    p, n = min(rows, cols), max(rows, cols)
    s2 = np.sort(np.asarray(gram_eigenvalues, dtype=np.float64))
    if s2.shape != (p,):
        raise ValueError(f"expected {p} eigenvalues for a {rows}x{cols} matrix, got {s2.shape}")
    if p < 2:
        raise ValueError("MP fit needs a matrix with at least 2 rows and 2 columns")
    gamma = p / n
    lam = s2 / n

    lo_idx, hi_idx = int(np.floor(alpha * p)), int(np.floor((1.0 - alpha) * p))
    if hi_idx - lo_idx < 8:
        lo_idx, hi_idx = 0, p
    idx = np.arange(lo_idx, hi_idx)
    levels = (idx + 0.5) / p
    q = mp_quantiles(levels, gamma)
    window = lam[lo_idx:hi_idx]
    denom = float(np.dot(q, q))
    sigma2 = float(np.dot(q, window) / denom) if denom > 0 else 0.0

    frob2 = float(s2.sum())
    top = float(s2[-1])
    if sigma2 <= 0.0 or frob2 <= 0.0:
        # All-zero (or rank-deficient beyond the window) matrix: no bulk to speak of.
        return MPFit(rows, cols, gamma, 0.0, 0.0, 0.0, 0.0, int(np.count_nonzero(s2 > 0)),
                     0.0, 1.0, 1.0 if frob2 > 0 else 0.0, float(np.sqrt(top)),
                     float(np.sqrt(frob2)), 1.0 if top > 0 else 0.0, float("inf") if top > 0 else 0.0, s2)

    lambda_plus = sigma2 * (1.0 + np.sqrt(gamma)) ** 2
    sigma_plus = float(np.sqrt(n * lambda_plus))
    margin = tracy_widom_margin(gamma, n, tw_confidence) if tw_confidence else 0.0
    spike_threshold = float(np.sqrt(n * sigma2 * ((1.0 + np.sqrt(gamma)) ** 2 + margin)))

    s = np.sqrt(s2)
    spike_mask = s > spike_threshold
    fit_error = float(np.max(np.abs(mp_cdf(window / sigma2, gamma) - levels)))
    return MPFit(
        rows=int(rows),
        cols=int(cols),
        gamma=float(gamma),
        sigma2=sigma2,
        lambda_plus=float(lambda_plus),
        sigma_plus=sigma_plus,
        spike_threshold=spike_threshold,
        spikes=int(np.count_nonzero(spike_mask)),
        bulk_fraction=float(np.count_nonzero(s <= sigma_plus) / p),
        fit_error=fit_error,
        spike_mass_ratio=float(s2[spike_mask].sum() / frob2),
        spectral_norm=float(np.sqrt(top)),
        frobenius_norm=float(np.sqrt(frob2)),
        stable_rank=float(frob2 / top),
        top_singular_over_edge=float(np.sqrt(top) / sigma_plus),
        eigenvalues=s2,
    )
