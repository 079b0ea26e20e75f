"""Unstructured, data-free pruning methods from the seed papers (pure numpy).

- ``rmt_sv_prune`` (seed 000 / P2 "Classical RMT"): sparsify each singular vector with a
  threshold that grows as its singular value sinks below the MP edge σ+ (bulk directions
  are noise: their small entries go first), recompose, then remove the smallest-magnitude
  entries of the denoised matrix up to the layer's budget. Budgets grow with the bulk
  fraction γ and shrink with the MP fit error μ: more random layers are pruned harder.
- ``spectral_sample_prune`` (seed 003): rank entries by the magnitude of the rank-k
  principal-component matrix rather than of W, so the entries that carry the dominant
  singular directions survive; optionally sample instead of thresholding.

These are unstructured (no 2:4 speedup); they exist so users can compare the seeds' methods
with the same tool and the same spectrum-preservation metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpcompile.numerics.mp_law import MPFit, fit_mp

__all__ = ["PruneResult", "rmt_sv_prune", "spectral_sample_prune", "rmt_layer_fractions", "magnitude_prune"]


@dataclass
class PruneResult:
    weight: np.ndarray
    mask: np.ndarray
    removed_fraction: float


def _prune_smallest(w: np.ndarray, score: np.ndarray, fraction: float) -> PruneResult:
    fraction = float(np.clip(fraction, 0.0, 1.0))
    count = int(round(fraction * w.size))
    mask = np.ones(w.shape, dtype=bool)
    if count:
        drop = np.argpartition(score.ravel(), count - 1)[:count]
        mask.ravel()[drop] = False
    return PruneResult(np.where(mask, w, 0).astype(w.dtype), mask, 1.0 - mask.mean())


def magnitude_prune(w: np.ndarray, fraction: float) -> PruneResult:
    """The baseline: remove the ``fraction`` smallest |W| entries."""
    return _prune_smallest(w, np.abs(w), fraction)


def rmt_sv_prune(
    w: np.ndarray,
    fraction: float,
    *,
    fit: MPFit | None = None,
    theta_scale: float = 1.125e-5,
    power: float = 30.0,
    floor: float = 1.0 / 750.0,
) -> PruneResult:
    """Singular-vector sparsification below σ+ (P1/P2 thresholds), then magnitude pruning.

    Threshold per singular vector i: ``T_i = θ·max(floor, (1 − s_i/σ+)₊^power)`` with
    ``θ = theta_scale·√(MN)`` (P1 ``magnitude_rmt_sweep.sv_prune_layer``). Vectors of spikes
    (s_i > σ+) get only the floor threshold, so the signal directions survive intact.
    """
    a = np.asarray(w, dtype=np.float64)
    fit = fit or fit_mp(a)
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    theta = theta_scale * np.sqrt(a.size)
    ratio = np.clip(1.0 - s / max(fit.sigma_plus, 1e-300), 0.0, None)
    thresholds = theta * np.maximum(floor, ratio**power)
    u = np.where(np.abs(u) < thresholds[None, :], 0.0, u)
    vt = np.where(np.abs(vt) < thresholds[:, None], 0.0, vt)
    denoised = (u * s) @ vt
    result = _prune_smallest(denoised, np.abs(denoised), fraction)
    return PruneResult(result.weight.astype(np.asarray(w).dtype), result.mask, result.removed_fraction)


def rmt_layer_fractions(fits: list[MPFit], target: float, cap: float = 0.95) -> np.ndarray:
    """Per-layer removal fractions averaging ``target`` (weighted by size), ∝ (1−μ)·γ_bulk.

    P2's budget rule: layers whose spectrum is mostly bulk (high bulk fraction) with a good
    MP fit (low μ) are the most random, so they lose the most entries.
    """
    if not fits:
        return np.zeros(0)
    randomness = np.array([max(0.0, 1.0 - f.fit_error) * f.bulk_fraction for f in fits])
    sizes = np.array([f.rows * f.cols for f in fits], dtype=np.float64)
    if randomness.sum() == 0:
        return np.full(len(fits), target)
    scale = target * sizes.sum() / float(np.dot(randomness, sizes))
    fractions = np.minimum(cap, randomness * scale)
    # redistribute what the cap removed, proportionally, until the total matches
    for _ in range(10):
        deficit = target * sizes.sum() - float(np.dot(fractions, sizes))
        room = (fractions < cap) * sizes
        if deficit <= 1e-9 or room.sum() == 0:
            break
        fractions = np.minimum(cap, fractions + deficit * (fractions < cap) / room.sum())
    return fractions


def spectral_sample_prune(
    w: np.ndarray,
    fraction: float,
    *,
    rank: int | None = None,
    sample: bool = False,
    seed: int = 0,
) -> PruneResult:
    """Keep the entries where the rank-k principal component matrix is largest.

    ``rank`` defaults to the number of MP spikes (at least 1): exactly the signal directions.
    With ``sample=True`` entries are kept by sampling without replacement with probability
    ∝ |W_k| (the paper's randomized variant) instead of thresholding.
    """
    a = np.asarray(w, dtype=np.float64)
    if rank is None:
        rank = max(1, fit_mp(a).spikes)
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    principal = (u[:, :rank] * s[:rank]) @ vt[:rank]
    score = np.abs(principal)
    if not sample:
        return _prune_smallest(np.asarray(w), score, fraction)
    keep_count = a.size - int(round(np.clip(fraction, 0, 1) * a.size))
    probabilities = score.ravel() / score.sum()
    rng = np.random.default_rng(seed)
    kept = rng.choice(a.size, size=keep_count, replace=False, p=probabilities)
    mask = np.zeros(a.size, dtype=bool)
    mask[kept] = True
    mask = mask.reshape(a.shape)
    return PruneResult(np.where(mask, w, 0).astype(np.asarray(w).dtype), mask, 1.0 - mask.mean())
