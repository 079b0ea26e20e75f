"""Pruning-limit estimators from weight magnitudes and a curvature scale (seed 002), numpy only.

Seed 002 ("how sparse can a network be pruned", a convex-geometry argument) says the limit
depends on two things: the magnitudes of the weights and the sharpness of the loss. Its exact
bound is a Gaussian-width / statistical-dimension condition on the loss sublevel set; what
lives here is a **second-order approximation** of it, stated so it can be checked:

Removing the set S of weights moves the parameters by ``δ = −w_S``. Near a minimum the loss
rises by ``ΔL ≈ ½ δᵀHδ``. When δ is not aligned with the Hessian's eigenvectors (the same
random-direction assumption behind the paper's Gaussian-width argument), ``δᵀHδ ≈ κ‖δ‖²``
with ``κ = tr(H)/D`` — an isotropic curvature. The loss stays within ``ε`` while

    E(S) = Σ_{i∈S} w_i²  ≤  2ε/κ          ("removed-energy budget")

and magnitude pruning removes the smallest |w| first, so the predicted limit is

    ρ* = max{ k/D : Σ_{i≤k} w_(i)² ≤ 2ε/κ },   w_(1)² ≤ w_(2)² ≤ … (ascending).

Without data κ is unknown: the **data-free magnitude bound** assumes κ = ``sharpness``
(a stated default, or the user's value) and is labelled as such. With data, κ comes from the
Hessian spectral density (``mpcompile.limit``, stochastic Lanczos quadrature).

This is an approximation of the paper's bound, not the bound itself: it ignores the
alignment of w_S with sharp directions and treats the loss as exactly quadratic.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mpcompile.errors import UsageError

__all__ = [
    "DEFAULT_SHARPNESS",
    "DEFAULT_TOLERANCE",
    "MagnitudeBound",
    "energy_budget",
    "layer_bounds",
    "magnitude_bound",
    "ratio_within_energy",
    "removed_energy_curve",
]

logger = logging.getLogger(__name__)

DEFAULT_SHARPNESS = 1.0  # assumed isotropic curvature κ (per weight) when no data is given
DEFAULT_TOLERANCE = 0.05  # ε: allowed loss rise (nats for cross-entropy)
DATA_FREE_LABEL = "data-free magnitude bound"


@dataclass
class MagnitudeBound:
    """The predicted limit for one weight set (a layer, or all GEMM weights together).

    Attributes:
        name: layer name, or ``"global"``.
        ratio: ρ*, the largest fraction of these weights magnitude pruning may remove.
        parameters: D, the number of weights considered.
        energy_budget: 2ε/κ, the removed squared-magnitude allowed.
        total_energy: Σ w², for scale.
        tolerance: ε.
        sharpness: κ used (assumed when ``label`` says data-free).
        label: which estimator produced it.
    """

    name: str
    ratio: float
    parameters: int
    energy_budget: float
    total_energy: float
    tolerance: float
    sharpness: float
    label: str = DATA_FREE_LABEL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def energy_budget(tolerance: float, sharpness: float) -> float:
    """2ε/κ: the removed energy Σ w² a loss rise of ε allows under isotropic curvature κ."""
    if tolerance < 0:
        raise UsageError(f"tolerance must be ≥ 0, got {tolerance}")
    if not sharpness > 0:
        raise UsageError(f"sharpness (curvature) must be > 0, got {sharpness}")
    return 2.0 * tolerance / sharpness


def removed_energy_curve(weights: np.ndarray) -> np.ndarray:
    """``E[k] = Σ_{i≤k} w_(i)²`` for k = 0..D (ascending magnitude order, E[0] = 0)."""
    sq = np.sort(np.square(np.asarray(weights, dtype=np.float64).ravel()))
    return np.concatenate(([0.0], np.cumsum(sq)))


def ratio_within_energy(weights: np.ndarray, budget: float) -> float:
    """The largest k/D with ``E[k] ≤ budget`` (magnitude order: smallest weights go first)."""
    curve = removed_energy_curve(weights)
    size = curve.size - 1
    if size == 0:
        return 0.0
    # E is non-decreasing, so the count of entries ≤ budget (minus E[0]) is the largest k.
    k = int(np.searchsorted(curve, budget, side="right")) - 1
    return k / size


def magnitude_bound(
    weights: np.ndarray,
    tolerance: float = DEFAULT_TOLERANCE,
    sharpness: float = DEFAULT_SHARPNESS,
    name: str = "global",
    label: str = DATA_FREE_LABEL,
) -> MagnitudeBound:
    """ρ* for one weight set under curvature ``sharpness`` and loss tolerance ``tolerance``."""
    w = np.asarray(weights, dtype=np.float64).ravel()
    budget = energy_budget(tolerance, sharpness)
    return MagnitudeBound(
        name=name,
        ratio=ratio_within_energy(w, budget),
        parameters=int(w.size),
        energy_budget=budget,
        total_energy=float(np.dot(w, w)),
        tolerance=float(tolerance),
        sharpness=float(sharpness),
        label=label,
    )


def layer_bounds(
    weights: Mapping[str, np.ndarray],
    tolerance: float = DEFAULT_TOLERANCE,
    sharpness: float = DEFAULT_SHARPNESS,
) -> tuple[list[MagnitudeBound], MagnitudeBound]:
    """Per-layer bounds (each layer alone gets the whole tolerance) and the global one.

    The per-layer numbers say how far each layer could go if it were the only one pruned; the
    global number (all weights under one magnitude threshold) is the one to compare with a
    global pruning ratio.
    """
    if not weights:
        raise UsageError("no weights to bound")
    per_layer = [magnitude_bound(w, tolerance, sharpness, name=name) for name, w in weights.items()]
    everything = np.concatenate([np.asarray(w, dtype=np.float64).ravel() for w in weights.values()])
    return per_layer, magnitude_bound(everything, tolerance, sharpness, name="global")
