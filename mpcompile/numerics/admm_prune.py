"""N:M pruning by ADMM with gradual mask selection, then the exact weight update on the final mask.

Why: SparseGPT's update is a single left-to-right OBS sweep. It fixes each group's mask before
the later columns have been compensated and never revisits a kept weight once its column has
passed, so for the mask it picks its weights are not the least-squares optimum, and the mask is
chosen greedily. Boža (2024, "Fast and Optimal Weight Update for Pruned Large Language Models")
poses the layer problem as it is::

    min_Ŵ  ||(W − Ŵ) Xᵀ||²  =  tr((W − Ŵ) H (W − Ŵ)ᵀ),   H = XᵀX,   Ŵ N:M sparse

and solves it by ADMM (splitting Ŵ into an unconstrained copy V and a sparse copy Z):

    V ← (W H + ρ (Z − U)) (H + ρI)⁻¹      (one Cholesky factor, reused every iteration)
    Z ← Π_mask(V + U)                     (projection: keep the mask's entries)
    U ← U + V − Z

with the mask itself grown gradually over the first iterations (a cubic schedule from dense
to N:M, scored by ``|V + U|`` in column-normalised coordinates, so the mask follows the
compensated weights instead of the raw ones). ADMM only approaches the optimum of the final
mask, so — as ALPS (Meng et al. 2024) does after its ADMM phase — the result is finished by
conjugate gradients on that fixed support, which reaches the exact least-squares weights
(every row is an independent positive-definite problem). The finished weight is therefore the
*optimal* update for its mask; given SparseGPT's (or CAST-OBS's) mask it can only lower their
error, and :func:`admm_nm` can also be seeded with such a mask (``init_mask``).

Pure numpy/scipy on ``W[out, K]`` and ``H[K, K]`` (``K`` in TensorRT grouping order, groups of
``m`` consecutive entries per row, as in :mod:`mpcompile.numerics.masks`); nothing of ONNX.
Computation is float64, in coordinates where every input column has unit second moment
(the reference code's normalisation: ρ and the damping are then scale free).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

__all__ = ["AdmmSolution", "admm_24", "admm_nm", "gradual_keep_mask", "masked_least_squares"]

logger = logging.getLogger(__name__)

DEFAULT_ITERS = 20
DEFAULT_MASK_ITERS = 20  # the reference's ``iterative_prune``: mask grows over these iterations
DEFAULT_CG_ITERS = 20  # warm-started from ADMM: ~0.1 % of the error left after 20 (measured)
DEFAULT_RHO = 1.0
DEFAULT_DAMP = 0.01  # SparseGPT's default, so both minimise the same damped objective
_CG_RTOL = 1e-6  # stop when every row's residual norm fell by this factor


@dataclass
class AdmmSolution:
    """The sparse weight, its mask, and the objective along the way (for convergence checks)."""

    weight: np.ndarray
    """float64 ``[out, K]``, exact zeros off the mask."""
    mask: np.ndarray
    """bool ``[out, K]``, exactly ``n`` kept per group of ``m``."""
    history: list[float] = field(default_factory=list)
    """With ``track``: the damped objective ``tr(ΔW (H+λI) ΔWᵀ)`` (normalised) of the sparse iterate Z after each
    ADMM iteration, then after each conjugate-gradient step."""
    admm_iterations: int = 0
    cg_iterations: int = 0
    seconds: float = 0.0


def _normalised(w: np.ndarray, gram: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(Wn, Hn, scale, dead)``: unit-diagonal coordinates, SparseGPT's dead-column handling.

    A column with no input variance cannot affect the output: its weight is zeroed and its
    row/column of H replaced by the identity, so H stays positive definite and the column is
    the cheapest one to drop. Damping adds ``damp`` (× the unit mean diagonal) to the diagonal.
    """
    h = np.array(gram, dtype=np.float64)
    diag = np.diag(h).copy()
    dead = ~(diag > 0.0)
    scale = np.sqrt(np.where(dead, 1.0, diag))
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    h /= scale[:, None]
    h /= scale[None, :]
    h[np.diag_indices_from(h)] += damp
    wn = np.asarray(w, dtype=np.float64) * scale[None, :]
    wn[:, dead] = 0.0
    return wn, h, scale, dead


def _objective(wn: np.ndarray, z: np.ndarray, h: np.ndarray) -> float:
    d = wn - z
    return float(np.einsum("ij,ij->", d @ h, d))


def gradual_keep_mask(score: np.ndarray, n: int, m: int, fraction: float) -> np.ndarray:
    """Keep mask that prunes ``fraction`` of the N:M budget: the lowest-scoring candidates first.

    The candidates are the ``m − n`` lowest scores of every group (the top ``n`` of a group are
    always kept), so at ``fraction = 1`` the mask is exactly N:M and before that it is a superset
    of an N:M mask -- the reference code's schedule, generalised from 2:4.
    """
    out, k = score.shape
    s = score.reshape(out, k // m, m)
    order = np.argsort(-s, axis=-1, kind="stable")
    keep = np.zeros(s.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    budget = out * (k // m) * (m - n)
    prune = round(fraction * budget)
    if prune >= budget:
        return keep.reshape(out, k)
    cand = np.where(keep, np.inf, s).ravel()
    keep_flat = np.ones(cand.shape, dtype=bool)
    if prune > 0:
        lowest = np.argpartition(cand, prune - 1)[:prune]
        keep_flat[lowest] = False
    return keep_flat.reshape(out, k)


def masked_least_squares(wn: np.ndarray, h: np.ndarray, mask: np.ndarray, start: np.ndarray,
                         iters: int = DEFAULT_CG_ITERS, history: list[float] | None = None
                         ) -> tuple[np.ndarray, int]:
    """Conjugate gradients for ``min_V tr((Wn − V) H (Wn − V)ᵀ)`` with ``V`` zero off ``mask``.

    Rows are independent problems sharing H, so all rows step together (one ``[out, K] @ H``
    product per iteration) with their own step sizes. CG never raises the objective, so the
    result is at least as good as ``start`` (which must be zero off the mask).
    """
    v = np.where(mask, start, 0.0)
    r = np.where(mask, (wn - v) @ h, 0.0)
    p = r.copy()
    rr = np.einsum("ij,ij->i", r, r)
    stop = (_CG_RTOL ** 2) * np.maximum(rr, 1e-300)
    done = 0
    for done in range(1, iters + 1):
        active = rr > stop
        if not np.any(active):
            done -= 1
            break
        ap = np.where(mask, p @ h, 0.0)
        pap = np.einsum("ij,ij->i", p, ap)
        alpha = np.where(active & (pap > 0), rr / np.where(pap > 0, pap, 1.0), 0.0)
        v += alpha[:, None] * p
        r -= alpha[:, None] * ap
        rr_new = np.einsum("ij,ij->i", r, r)
        beta = np.where(active, rr_new / np.maximum(rr, 1e-300), 0.0)
        p = r + beta[:, None] * p
        rr = rr_new
        if history is not None:
            history.append(_objective(wn, v, h))
    return v, done


def admm_nm(
    w: np.ndarray,
    gram: np.ndarray,
    n: int = 2,
    m: int = 4,
    *,
    iters: int = DEFAULT_ITERS,
    mask_iters: int = DEFAULT_MASK_ITERS,
    cg_iters: int = DEFAULT_CG_ITERS,
    rho: float = DEFAULT_RHO,
    damp: float = DEFAULT_DAMP,
    init_mask: np.ndarray | None = None,
    track: bool = False,
) -> AdmmSolution:
    """ADMM N:M pruning of ``w[out, K]`` under ``gram[K, K]`` (any positive scale of XᵀX).

    ``init_mask`` (bool, exactly N:M) fixes the mask: then only the weight update runs. Else
    the mask is grown over ``mask_iters`` of the ``iters`` ADMM iterations. ``cg_iters``
    conjugate-gradient steps finish the update on the final mask (0: keep ADMM's Z).
    ``track`` records the objective after every step in ``history`` (one more ``[out, K] @ H``
    product each, so off by default). Callers validate shapes and n:m (see :func:`mpcompile.numerics.masks.admm_24`).
    """
    t0 = time.perf_counter()
    k = w.shape[1]
    wn, h, scale, dead = _normalised(w, gram, damp)
    history: list[float] = []
    if init_mask is not None:
        mask = np.asarray(init_mask, dtype=bool)
        z = np.where(mask, wn, 0.0)
        done = 0
    else:
        mask_iters = max(1, min(mask_iters, iters)) if iters > 0 else 0
        lhs = h.copy()
        lhs[np.diag_indices_from(lhs)] += rho
        # An explicit inverse: every iteration is then one GEMM (triangular solves on an
        # [K, out] right-hand side ran ~3x slower), and H + ρI is well conditioned (ρ ≥ diag).
        inverse = scipy.linalg.cho_solve(scipy.linalg.cho_factor(lhs, lower=True, check_finite=False),
                                         np.eye(k), overwrite_b=True, check_finite=False)
        del lhs
        wh = wn @ h  # the X·Y term; H symmetric
        v = wn.copy()
        u = np.zeros_like(wn)
        mask = gradual_keep_mask(np.abs(wn), n, m, 1.0) if iters == 0 else np.ones_like(wn, dtype=bool)
        z = np.where(mask, wn, 0.0)
        done = 0
        for done in range(1, iters + 1):
            if done <= mask_iters:
                t = done / mask_iters
                mask = gradual_keep_mask(np.abs(v + u), n, m, 1.0 - (1.0 - t) ** 3)
            z = np.where(mask, v + u, 0.0)
            u += v - z
            # V = (W H + ρ(Z − U)) (H + ρI)⁻¹, solved as (H + ρI) Vᵀ = (...)ᵀ
            v = (wh + rho * (z - u)) @ inverse
            if track:
                history.append(_objective(wn, z, h))
    cg_done = 0
    if cg_iters > 0:
        z, cg_done = masked_least_squares(wn, h, mask, z, cg_iters, history if track else None)
    weight = z / scale[None, :]
    weight[:, dead] = 0.0
    weight[~mask] = 0.0
    seconds = time.perf_counter() - t0
    logger.debug("admm %s %d:%d: %d ADMM + %d CG iterations in %.3f s", w.shape, n, m, done, cg_done, seconds)
    return AdmmSolution(weight, mask, history, done, cg_done, seconds)


def admm_24(
    w: np.ndarray,
    stats,
    n: int = 2,
    m: int = 4,
    *,
    init: str = "gradual",
    iters: int = DEFAULT_ITERS,
    mask_iters: int = DEFAULT_MASK_ITERS,
    cg_iters: int = DEFAULT_CG_ITERS,
    rho: float = DEFAULT_RHO,
    damp: float = DEFAULT_DAMP,
):
    """The ``admm`` mask method (same signature and result as the others in ``masks``).

    ``init="gradual"``: Boža's ADMM with gradual mask selection. A mask method's name
    (``"sparsegpt"``, ``"cast-obs"``, ...) takes that method's mask and gives it the optimal
    weights instead. Without calibration statistics it is magnitude N:M, like every
    calibration method.
    """
    # Imported here: ``masks`` registers this method at its end, so a top-level import would cycle.
    from mpcompile.numerics import masks

    w = masks._check_weight(w, n, m)
    if iters < 0 or cg_iters < 0 or not 0 <= mask_iters:
        raise masks.MaskUsageError(f"admm iteration counts must be >= 0, got iters={iters}, "
                                   f"mask_iters={mask_iters}, cg_iters={cg_iters}")
    if not rho > 0 or damp < 0:
        raise masks.MaskUsageError(f"admm needs rho > 0 and damp >= 0, got rho={rho}, damp={damp}")
    if init != "gradual" and (init not in masks.MASK_METHODS or init == "admm"):
        raise masks.MaskUsageError(f"admm init must be 'gradual' or another mask method, got {init!r}")
    gram = masks._gram_of(stats, w.shape[1])
    if gram is None:
        return masks._magnitude_result(w, n, m, "admm")
    init_mask = None if init == "gradual" else masks.apply_method(init, w, stats, n=n, m=m).mask
    solution = admm_nm(w, gram, n, m, iters=iters, mask_iters=mask_iters, cg_iters=cg_iters, rho=rho,
                       damp=damp, init_mask=init_mask)
    out_w = masks.updated_weight(solution.weight, solution.mask, w.dtype, "admm")
    return masks._result(w, solution.mask, "admm", True, weight=out_w)
