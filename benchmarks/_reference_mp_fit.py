"""Anchor for ``analyze_speed.py``: the papers' plain MP fit, full SVD + root-found quantiles.

Why it exists: DESIGN §5 asks mpcompile's analysis to beat "a plain full-SVD + root-finding MP
fit of the same weights" in the same run. This script *is* that baseline, written the way
the reference code does it (reference/mp-pruning-algorithms.md §1.2, ``RMT_pruning_ViT``
``src/RMT.py::bema_inside``/``qmp``/``pmp``):

- every GEMM/Conv weight is loaded with ``onnx.numpy_helper`` and viewed as torch stores it,
  ``[out, in]`` (Conv: ``reshape(Cout, -1)``);
- ``np.linalg.svd(W, full_matrices=True)`` on the stored float32 matrix;
- eigenvalues ``λ = s²/n`` with ``n = max(M, N)`` (the P1 ``adaptive_rmt`` convention, so
  σ² is the per-entry bulk variance and comparable with mpcompile's);
- BEMA on the central window ``k ∈ [⌊αp⌋, ⌊(1−α)p⌋)`` with quantiles at levels ``k/p``
  of the unit MP law, each one a ``scipy.optimize.brentq`` root of a ``scipy.integrate.quad`` CDF,
  cached per ``(p, n, α)``;
- ``λ+ = σ̂²(1+√γ)²``, ``σ+ = √(n·λ+)``, spikes = ``#{s > σ+}`` (no Tracy–Widom margin).

It deliberately imports nothing from mpcompile: it is an independent measurement.
Run: ``python benchmarks/_reference_mp_fit.py MODEL.onnx [--singular-values OUT.npz]``;
prints one JSON object (per-layer σ², σ+, spikes and the fit time) on stdout.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import numpy_helper
from scipy import integrate, optimize

__all__ = ["ReferenceFit", "mp_pdf", "mp_cdf_quad", "mp_quantile_brentq", "window_quantiles",
           "bema_sigma2", "reference_fit", "gemm_weights"]

logger = logging.getLogger(__name__)


def mp_pdf(x: float, gamma: float) -> float:
    """Unit-variance MP density for ratio γ = p/n ≤ 1."""
    lo, hi = (1.0 - math.sqrt(gamma)) ** 2, (1.0 + math.sqrt(gamma)) ** 2
    if x <= lo or x >= hi:
        return 0.0
    return math.sqrt((hi - x) * (x - lo)) / (2.0 * math.pi * gamma * x)


def mp_cdf_quad(x: float, gamma: float) -> float:
    lo, hi = (1.0 - math.sqrt(gamma)) ** 2, (1.0 + math.sqrt(gamma)) ** 2
    if x <= lo:
        return 0.0
    if x >= hi:
        return 1.0
    return integrate.quad(mp_pdf, lo, x, args=(gamma,))[0]


def mp_quantile_brentq(level: float, gamma: float) -> float:
    lo, hi = (1.0 - math.sqrt(gamma)) ** 2, (1.0 + math.sqrt(gamma)) ** 2
    if level <= 0.0:
        return lo
    if level >= 1.0:
        return hi
    return optimize.brentq(lambda x: mp_cdf_quad(x, gamma) - level, lo, hi)


@functools.lru_cache(maxsize=None)
def window_quantiles(p: int, n: int, alpha: float, midpoint: bool = False) -> np.ndarray:
    """Quantiles of the unit MP law at the BEMA window levels (reference: ``k/p``).

    ``midpoint=True`` uses ``(k+½)/p`` instead; analyze_speed uses it only to separate the
    level convention from the numerical accuracy of mpcompile's tabulated quantiles.
    """
    gamma = p / n
    offset = 0.5 if midpoint else 0.0
    return np.array([mp_quantile_brentq((k + offset) / p, gamma)
                     for k in range(int(alpha * p), int((1 - alpha) * p))])


def bema_sigma2(singular_values: np.ndarray, rows: int, cols: int, alpha: float = 0.25,
                midpoint: bool = False) -> float:
    """σ̂² = Σ q_k λ_(k) / Σ q_k² over the central window of ascending λ = s²/n."""
    p, n = min(rows, cols), max(rows, cols)
    lam = np.sort(np.asarray(singular_values, dtype=np.float64) ** 2 / n)
    q = window_quantiles(p, n, alpha, midpoint)
    window = lam[int(alpha * p): int((1 - alpha) * p)]
    return float(np.dot(q, window) / np.dot(q, q))


@dataclass
class ReferenceFit:
    weight: str
    node: str
    rows: int
    cols: int
    sigma2: float
    lambda_plus: float
    sigma_plus: float
    spikes: int


def reference_fit(
    w: np.ndarray, weight: str, node: str, alpha: float = 0.25
) -> tuple[ReferenceFit, np.ndarray]:
    rows, cols = w.shape
    p, n = min(rows, cols), max(rows, cols)
    _, s, _ = np.linalg.svd(w, full_matrices=True)
    sigma2 = bema_sigma2(s, rows, cols, alpha)
    lambda_plus = sigma2 * (1.0 + math.sqrt(p / n)) ** 2
    sigma_plus = math.sqrt(n * lambda_plus)
    return ReferenceFit(weight, node, rows, cols, sigma2, lambda_plus, sigma_plus,
                        int(np.count_nonzero(s > sigma_plus))), s


def gemm_weights(model: onnx.ModelProto):
    """Yield ``(node name, weight name, [out, in] matrix)`` for MatMul/Gemm/Conv initializer weights."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2:
            continue
        tensor = inits.get(node.input[1])
        if tensor is None:
            continue
        w = numpy_helper.to_array(tensor)
        if node.op_type == "MatMul":
            if w.ndim != 2:
                continue
            matrix = w.T  # [K, N] → torch's [out, in]
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            matrix = w if trans_b else w.T
        else:
            matrix = w.reshape(w.shape[0], -1)
        yield node.name, tensor.name, matrix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--alpha", type=float, default=0.25)
    parser.add_argument("--singular-values", metavar="OUT.npz",
                        help="also save every layer's singular values (keyed by weight name)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    model = onnx.load(args.model)
    load_s = time.perf_counter() - start
    fits, spectra = [], {}
    for node, weight, matrix in gemm_weights(model):
        fit, s = reference_fit(matrix, weight, node, args.alpha)
        fits.append(fit)
        spectra[weight] = s
    fit_s = time.perf_counter() - start - load_s
    if args.singular_values:
        np.savez(args.singular_values, **spectra)
    json.dump({"load_seconds": load_s, "fit_seconds": fit_s,
               "layers": [asdict(f) for f in fits]}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
