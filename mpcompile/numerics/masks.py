"""N:M structured-sparsity masks for one layer: magnitude, CAST, Wanda and SparseGPT-style OBS.

Convention shared by all of mpcompile: a layer weight is ``W[out, K]`` with ``K`` the reduction
axis *already in TensorRT grouping order* (the caller transposes / reorders conv taps to
``(kh, kw, Cin)`` first), so an N:M group is simply ``m`` consecutive entries of a row. The
calibration input of the layer is ``X[rows, K]`` in the same ordering; every method only needs its
second moment, which :class:`LayerStats` computes once per layer and shares across methods.

Mask rule (all methods): the returned ``mask`` keeps **exactly n** positions in every group of
``m``. Where the dense row group already has zeros, a kept position may hold a zero, so the
written weight has *at most* ``n`` nonzeros per group -- exactly the TensorRT rule -- while the
mask itself always has the same count. Ties are deterministic: equal scores keep the lower index
of the group; equal CAST costs (dead input channels) are decided by magnitude.

Computation is in float64 (float16 weights would lose the small cost differences that decide
CAST / OBS choices); the returned weight has the input dtype and dropped entries are exact zeros.

Why one module of ~540 lines: the five methods share the weight checks, the result type and
the tie rules above, and ``apply_method`` / ``reconstruction_error`` must see all of them;
the statistics they read live in ``layer_stats.py``.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import numpy as np
import scipy.linalg

from mpcompile.numerics.layer_stats import LayerStats, MaskInputError, MaskUsageError, upper_row_start

__all__ = [
    "LayerStats",
    "MaskResult",
    "PackedMaskResult",
    "upper_row_start",
    "MaskMethod",
    "MaskInputError",
    "MaskUsageError",
    "MASK_METHODS",
    "nm_patterns",
    "nm_mask_magnitude",
    "magnitude_24",
    "cast_24",
    "wanda_24",
    "sparsegpt_24",
    "apply_method",
    "is_nm_sparse",
    "reconstruction_error",
    "cast_cost",
]

logger = logging.getLogger(__name__)

# Float64 temporaries CAST allocates per chunk of rows.
_CAST_CHUNK_BYTES = 32 * 2**20  # cache-friendly; well under the 256 MB cap
# Relative tolerance under which two CAST pattern costs count as a tie (then magnitude decides);
# far above float64 rounding noise of the cost, far below any difference that matters.
_CAST_TIE_RTOL = 1e-12
_FLOAT_DTYPES = (np.float16, np.float32, np.float64)


@dataclass
class MaskResult:
    mask: np.ndarray
    """bool ``[out, K]``, True = kept; exactly ``n`` True per group of ``m``."""
    weight: np.ndarray
    """Sparse weight in the input dtype: ``W*mask``, except SparseGPT also updates kept weights."""
    method: str
    kept_magnitude_fraction: float
    """``sum |W|·mask / sum |W|`` on the *dense* weight (1.0 for an all-zero weight)."""
    calibrated: bool = True
    """False when a calibration-aware method had no statistics and fell back to magnitude."""

    def packed(self, dense: np.ndarray) -> PackedMaskResult:
        """The same result in ~53 % of the memory (kept values + mask bits), for holding on to,
        with a signature of the ``dense`` weight it was computed from."""
        return PackedMaskResult(self.weight[self.mask], np.packbits(self.mask, axis=None), self.mask.shape,
                                self.method, self.kept_magnitude_fraction, self.calibrated,
                                weight_signature(dense))


def weight_signature(w: np.ndarray) -> np.ndarray:
    """One number per row (``W`` times a fixed random vector): changes when any entry or the row
    order does, so a result held for a weight is not applied to a weight rewritten since."""
    probe = np.random.default_rng(w.shape[1]).standard_normal(w.shape[1])
    return np.ascontiguousarray(w, dtype=np.float64) @ probe


@dataclass
class PackedMaskResult:
    """A :class:`MaskResult` whose pruned zeros are not stored (N:M keeps a fixed share)."""

    values: np.ndarray
    mask_bits: np.ndarray
    shape: tuple[int, int]
    method: str
    kept_magnitude_fraction: float
    calibrated: bool
    signature: np.ndarray

    def matches(self, dense: np.ndarray) -> bool:
        """Whether ``dense`` is the weight this result was computed from."""
        # Equal up to rounding: the same weight read through another memory layout may sum in
        # another order; a rewritten one differs in the leading digits.
        return tuple(dense.shape) == tuple(self.shape) and np.allclose(
            weight_signature(dense), self.signature, rtol=1e-9, atol=1e-12 * float(np.abs(self.signature).max(initial=0.0)))

    def unpack(self) -> MaskResult:
        count = self.shape[0] * self.shape[1]
        mask = np.unpackbits(self.mask_bits, count=count).astype(bool).reshape(self.shape)
        weight = np.zeros(self.shape, self.values.dtype)
        weight[mask] = self.values
        return MaskResult(mask, weight, self.method, self.kept_magnitude_fraction, self.calibrated)


class MaskMethod(Protocol):
    """Every method: ``(w, stats, n, m)`` plus optional method-specific keywords."""

    def __call__(
        self, w: np.ndarray, stats: LayerStats | None, n: int = 2, m: int = 4
    ) -> MaskResult: ...


# --------------------------------------------------------------------------- validation helpers


def _check_nm(n: int, m: int) -> None:
    if not (isinstance(n, (int, np.integer)) and isinstance(m, (int, np.integer))):
        raise MaskUsageError(f"n and m must be integers, got n={n!r}, m={m!r}")
    if not 0 < n < m:
        raise MaskUsageError(f"N:M sparsity needs 0 < n < m, got {n}:{m}")


def _check_weight(w: np.ndarray, n: int, m: int) -> np.ndarray:
    _check_nm(n, m)
    w = np.asarray(w)
    if w.ndim != 2:
        raise MaskInputError(f"weight must be 2-D [out, K], got shape {w.shape}")
    if w.dtype.type not in _FLOAT_DTYPES:
        raise MaskInputError(f"weight dtype {w.dtype} is not float16/float32/float64")
    if w.shape[1] % m != 0:
        raise MaskInputError(
            f"reduction axis K={w.shape[1]} is not a multiple of m={m}: cannot form {n}:{m} groups"
        )
    if not np.all(np.isfinite(w)):
        raise MaskInputError("weight contains NaN/Inf")
    return w


def _gram_of(stats: LayerStats | None, k: int) -> np.ndarray | None:
    if stats is None or not stats.has_gram:
        return None
    g = np.array(stats.gram, dtype=np.float64)  # always a copy: callers may work in place
    if g.shape != (k, k):
        raise MaskInputError(f"gram has shape {g.shape}, expected ({k}, {k}) for this weight")
    return g


def _kept_fraction(w: np.ndarray, mask: np.ndarray) -> float:
    """Σ|kept| / Σ|w| in float64, a block of rows at a time (no float64 copy of a whole layer)."""
    rows = max(1, (1 << 22) // max(w.shape[1] if w.ndim == 2 else 1, 1))
    total = kept = 0.0
    for start in range(0, w.shape[0], rows):
        a = np.abs(w[start:start + rows].astype(np.float64, copy=False))
        total += float(a.sum())
        kept += float(a[mask[start:start + rows]].sum())
    return 1.0 if total == 0.0 else kept / total


def _masked(w: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.where(mask, w, np.zeros((), dtype=w.dtype)).astype(w.dtype, copy=False)


def _result(w: np.ndarray, mask: np.ndarray, method: str, calibrated: bool,
            weight: np.ndarray | None = None) -> MaskResult:
    return MaskResult(
        mask=mask,
        weight=_masked(w, mask) if weight is None else weight,
        method=method,
        kept_magnitude_fraction=_kept_fraction(w, mask),
        calibrated=calibrated,
    )


# --------------------------------------------------------------------------- generic N:M helpers


@lru_cache(maxsize=32)
def nm_patterns(n: int, m: int) -> np.ndarray:
    """All keep patterns with ``n`` of ``m`` set, ``[C(m,n), m]`` bool, lexicographic order."""
    _check_nm(n, m)
    combos = list(itertools.combinations(range(m), n))
    table = np.zeros((len(combos), m), dtype=bool)
    for p, idx in enumerate(combos):
        table[p, list(idx)] = True
    table.setflags(write=False)
    return table


def _topn_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep the ``n`` largest scores of each group; ties go to the lower index (stable sort)."""
    out, k = scores.shape
    s = scores.reshape(out, k // m, m)
    order = np.argsort(-s, axis=-1, kind="stable")[..., :n]
    mask = np.zeros(s.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=-1)
    return mask.reshape(out, k)


_MASK_BLOCK_ENTRIES = 1 << 22


def _magnitude_mask(w: np.ndarray, n: int, m: int) -> np.ndarray:
    """Top-``n`` ``|w|`` per group, a block of rows at a time (the same bits as all at once):
    the float64 scores and the argsort's int64 indices of a whole 32000 × 4096 LM head were
    3 GB at once, the peak of a streamed 7B compile."""
    out, k = w.shape
    rows = max(1, _MASK_BLOCK_ENTRIES // max(k, 1))
    mask = np.empty((out, k), dtype=bool)
    for start in range(0, out, rows):
        block = w[start:start + rows]
        mask[start:start + rows] = _topn_mask(np.abs(block.astype(np.float64, copy=False)), n, m)
    return mask


def nm_mask_magnitude(w: np.ndarray, n: int = 2, m: int = 4) -> np.ndarray:
    """Top-``n`` ``|w|`` per group of ``m`` along axis 1."""
    w = _check_weight(w, n, m)
    return _magnitude_mask(w, n, m)


def is_nm_sparse(w: np.ndarray, n: int = 2, m: int = 4) -> bool:
    """At most ``n`` nonzeros in every group of ``m`` along axis 1 (the TensorRT rule)."""
    w = np.asarray(w)
    _check_nm(n, m)
    if w.ndim != 2 or w.shape[1] % m:
        return False
    nnz = (w != 0).reshape(w.shape[0], -1, m).sum(axis=-1)
    return bool(np.all(nnz <= n))


# --------------------------------------------------------------------------- methods


def updated_weight(weight: np.ndarray, keep: np.ndarray, dtype: np.dtype, method: str) -> np.ndarray:
    """A float64 weight update in the layer's dtype, dropped entries exact zeros.

    Why clip: an OBS/ADMM update can push a kept weight past float16's ±65504, which would
    become ±inf in the written model; clipped, it stays finite (and the warning names it).
    """
    if dtype != np.float64:
        fmax = float(np.finfo(dtype).max)
        if np.abs(weight).max(initial=0.0) > fmax:
            logger.warning("%s: updated weights exceed %s range; clipping", method, dtype)
            np.clip(weight, -fmax, fmax, out=weight)
    out = weight.astype(dtype)
    out[~keep] = 0  # float16 rounding cannot resurrect a dropped entry, but be explicit
    return out


def _magnitude_result(w: np.ndarray, n: int, m: int, method: str) -> MaskResult:
    if method != "magnitude":
        logger.debug("%s: no calibration statistics, using magnitude top-%d of %d", method, n, m)
    return _result(w, _magnitude_mask(w, n, m), method, False)


def magnitude_24(
    w: np.ndarray, stats: LayerStats | None = None, n: int = 2, m: int = 4
) -> MaskResult:
    """Data-free baseline; ``stats`` is accepted and ignored so all methods share a signature."""
    return _magnitude_result(_check_weight(w, n, m), n, m, "magnitude")


def _cast_mask(w64: np.ndarray, blocks: np.ndarray, n: int, m: int) -> np.ndarray:
    """Per (row, group) argmin over keep patterns of ``rᵀ C_g r`` (r = dropped part of the row).

    With D = 1 − pattern, cost[p] = Σ_{a≤b} c_ab·D[p,a]·D[p,b] · W_a W_b C_g[a,b] (c_ab = 2 off
    the diagonal), so per chunk of rows we form the m(m+1)/2 pair products once, slot-major
    (contiguous [out·G] slabs, ~8x faster than a broadcast [out, G, m, m] tensor), and one
    ``[P, pairs] @ [pairs, out·G]`` product gives every pattern's cost for every group.
    """
    out, k = w64.shape
    g_count = k // m
    keep = nm_patterns(n, m)
    drop = (~keep).astype(np.float64)  # [P, m]
    n_pat = drop.shape[0]
    ia, ib = np.triu_indices(m)
    pair_w = drop[:, ia] * drop[:, ib] * np.where(ia == ib, 1.0, 2.0)  # [P, pairs]
    # blocks: [G, m, m], the diagonal blocks C_g of the input covariance
    sqrt_diag = np.sqrt(np.clip(np.diagonal(blocks, axis1=1, axis2=2), 0.0, None)).T  # [m, G]

    per_row = g_count * (len(ia) + 4 * n_pat + 3 * m) * 8
    chunk = int(max(1, min(out, _CAST_CHUNK_BYTES // max(per_row, 1))))
    mask = np.empty((out, g_count, m), dtype=bool)
    for r0 in range(0, out, chunk):
        ws = np.moveaxis(w64[r0 : r0 + chunk].reshape(-1, g_count, m), -1, 0).copy()  # [m, c, G]
        c = ws.shape[1]
        q = np.empty((len(ia), c, g_count))
        for t, (a, b) in enumerate(zip(ia, ib)):
            np.multiply(ws[a], ws[b], out=q[t])
            q[t] *= blocks[:, a, b]
        cost = (pair_w @ q.reshape(len(ia), -1)).reshape(n_pat, c, g_count)
        # Near-ties (dead input channels, whose dropping is free; an all-zero gram) are broken by
        # dropped |w|², so CAST degrades to magnitude rather than to an arbitrary pattern. The
        # tolerance scales with a Cauchy-Schwarz bound on |cost| for the group: float noise only.
        bound = np.square((np.abs(ws) * sqrt_diag[:, None, :]).sum(axis=0))  # [c, G]
        near = cost <= cost.min(axis=0) + _CAST_TIE_RTOL * bound
        mag_drop = (drop @ (ws * ws).reshape(m, -1)).reshape(n_pat, c, g_count)
        choice = np.argmin(np.where(near, mag_drop, np.inf), axis=0)  # [c, G]
        mask[r0 : r0 + c] = keep[choice]
    return mask.reshape(out, k)


def cast_24(w: np.ndarray, stats: LayerStats | None, n: int = 2, m: int = 4) -> MaskResult:
    """CAST (seed 001): minimise each group's calibration-averaged dropped output energy.

    Exhaustive over the C(m, n) patterns (6 for 2:4); without calibration it is magnitude top-n,
    as in the paper's code.
    """
    w = _check_weight(w, n, m)
    if stats is None or not stats.has_gram:
        return _magnitude_result(w, n, m, "cast")
    if stats.k != w.shape[1]:
        raise MaskInputError(f"gram has shape ({stats.k}, {stats.k}), expected ({w.shape[1]}, {w.shape[1]}) "
                             "for this weight")
    t0 = time.perf_counter()
    mask = _cast_mask(w.astype(np.float64), stats.diagonal_blocks(m), n, m)
    logger.debug("cast %s %d:%d in %.3f s", w.shape, n, m, time.perf_counter() - t0)
    return _result(w, mask, "cast", True)


def wanda_24(w: np.ndarray, stats: LayerStats | None, n: int = 2, m: int = 4) -> MaskResult:
    """Wanda (Sun et al. 2023): score ``|W_ij|·||X_j||``, top-n within each row's N:M group."""
    w = _check_weight(w, n, m)
    gram = _gram_of(stats, w.shape[1])
    if gram is None:
        return _magnitude_result(w, n, m, "wanda")
    col_norm = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    scores = np.abs(w.astype(np.float64, copy=False)) * col_norm[None, :]
    return _result(w, _topn_mask(scores, n, m), "wanda", True)


def _hinv_upper(holder: list[np.ndarray], damp: float) -> tuple[np.ndarray, np.ndarray]:
    """Upper Cholesky factor of ``(G + λI)⁻¹`` with SparseGPT's dead-column handling.

    ``holder`` is a one-item list with a float64 ``G`` this function takes over (the caller
    then holds no reference through its long sweep): damped in place, so at most three ``K×K``
    float64 matrices exist at once (at K = 4608 each is 170 MB; copies at every step made six).
    Returns ``(U, dead)``. Dead columns (zero input variance) get H_jj = 1 so H stays invertible;
    their weights do not affect the output and are zeroed by the caller. The damping is raised
    tenfold (up to four times) if a factorisation still fails, e.g. on a rank-deficient gram.
    """
    h = holder.pop()
    dead = np.diag(h) <= 0.0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    k = h.shape[0]
    diagonal = np.einsum("ii->i", h)  # a writable view of the diagonal
    mean_diag = float(np.mean(diagonal))
    lam = damp * mean_diag
    diagonal += lam
    for attempt in range(5):
        try:
            c, low = scipy.linalg.cho_factor(h, lower=True, check_finite=False)  # h kept for a retry
            hinv = scipy.linalg.cho_solve((c, low), np.eye(k), overwrite_b=True, check_finite=False)
            del c
            hinv += hinv.T  # symmetrise away rounding (numpy buffers the overlapping transpose)
            hinv *= 0.5
            u = scipy.linalg.cholesky(hinv, lower=False, overwrite_a=True, check_finite=False)
            return u, dead
        except np.linalg.LinAlgError:
            new = max(lam * 10.0, 1e-8 * max(mean_diag, 1e-300))
            logger.warning(
                "sparsegpt: Hessian not positive definite (damp %.3g), retrying with %.3g", lam, new
            )
            diagonal += new - lam
            lam = new
    raise MaskInputError("sparsegpt: calibration Hessian is not positive definite, even damped")


def sparsegpt_24(
    w: np.ndarray,
    stats: LayerStats | None,
    n: int = 2,
    m: int = 4,
    damp: float = 0.01,
    blocksize: int = 128,
    joint: bool = False,
) -> MaskResult:
    """SparseGPT (Frantar & Alistarh 2023) N:M: OBS mask per group, error fed to later columns.

    Follows the reference ``SparseGPT.fasterprune``: H = XᵀX/rows + damp·mean(diag H)·I, U =
    chol(H⁻¹) upper, lazy column blocks; at each group start the ``m−n`` entries with the
    smallest ``w²/U_jj²`` are pruned, and every pruned column's error ``(w−q)/U_jj`` is spread
    over the remaining columns through row ``j`` of U. Kept weights therefore change.
    """
    w = _check_weight(w, n, m)
    if blocksize <= 0 or blocksize % m:
        raise MaskUsageError(
            f"sparsegpt blocksize must be a positive multiple of m={m}, got {blocksize}"
        )
    if damp < 0:
        raise MaskUsageError(f"sparsegpt damp must be >= 0, got {damp}")
    holder = [_gram_of(stats, w.shape[1])]
    if holder[0] is None:
        # With H = I the OBS saliency is w² and no error propagates: exactly magnitude.
        return _magnitude_result(w, n, m, "cast-obs" if joint else "sparsegpt")

    t0 = time.perf_counter()
    out, k = w.shape
    hinv, dead = _hinv_upper(holder, damp)
    hinv_t = np.ascontiguousarray(hinv.T)  # slices of a transposed view miss BLAS (~50x slower)
    # Work on Wᵀ [K, out]: the sweep runs over K, so each column becomes a contiguous slab
    # (column access on the row-major weight was the dominant cost).
    wt = w.astype(np.float64).T.copy()
    wt[dead, :] = 0.0
    keep_t = np.ones((k, out), dtype=bool)
    n_prune = m - n
    cols = np.arange(out)[None, :]
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1 = wt[i1:i2].copy()
        h1 = hinv[i1:i2, i1:i2]
        d1 = np.diag(h1)
        err1 = np.zeros_like(w1)
        # Lazy updates one level further than the reference: a group's error reaches the rest of
        # the block in one [rest, m] @ [m, out] product. Same arithmetic, since the mask of a
        # group is chosen only after every earlier column's error has been folded into it.
        for g0 in range(0, i2 - i1, m):
            g1 = g0 + m
            if joint:
                keep_t[i1 + g0 : i1 + g1] = _joint_obs_keep(w1[g0:g1], h1[g0:g1, g0:g1], n, m)
            else:
                sal = w1[g0:g1] ** 2 / (d1[g0:g1] ** 2)[:, None]
                # prune the (m-n) least salient; stable sort => ties prune the lower index first
                drop = np.argsort(sal, axis=0, kind="stable")[:n_prune]
                keep_t[i1 + g0 + drop, cols] = False
            for i in range(g0, g1):
                row = w1[i]
                q = np.where(keep_t[i1 + i], row, 0.0)
                e = (row - q) / d1[i]
                if i + 1 < g1:
                    w1[i + 1 : g1] -= h1[i, i + 1 : g1, None] * e[None, :]
                w1[i] = q  # exact zero where pruned
                err1[i] = e
            if g1 < i2 - i1:
                w1[g1:] -= hinv_t[i1 + g1 : i2, i1 + g0 : i1 + g1] @ err1[g0:g1]
        wt[i1:i2] = w1
        if i2 < k:
            wt[i2:] -= hinv_t[i2:, i1:i2] @ err1
    keep = np.ascontiguousarray(keep_t.T)
    wk = np.ascontiguousarray(wt.T)
    wk[~keep] = 0.0
    out_w = updated_weight(wk, keep, w.dtype, "sparsegpt")
    logger.debug("sparsegpt %s %d:%d in %.3f s", w.shape, n, m, time.perf_counter() - t0)
    return _result(w, keep, "cast-obs" if joint else "sparsegpt", True, weight=out_w)


def _joint_obs_keep(wg: np.ndarray, u_group: np.ndarray, n: int, m: int) -> np.ndarray:
    """Exact best keep pattern per output for one group under OBS with compensation.

    After the earlier columns are eliminated, the inverse Hessian restricted to the group is
    ``UgᵀUg`` (``Ug`` the group's block of the upper Cholesky factor of H⁻¹). Pruning the set
    S jointly, with the remaining weights re-fitted, costs ``w_Sᵀ [(H⁻¹)_SS]⁻¹ w_S``; every
    one of the C(m, n) patterns is evaluated, which is CAST's exhaustive choice made on the
    conditional (already compensated) covariance instead of the raw one. The compensation
    that follows is SparseGPT's forward-only update, so kept weights before a pruned one in
    the group are not re-fitted: the chosen pattern is exact, the update a good approximation.
    """
    hinv_g = u_group.T @ u_group
    patterns = nm_patterns(n, m)  # [P, m] keep
    costs = np.empty((patterns.shape[0], wg.shape[1]))
    for index, keep in enumerate(patterns):
        pruned = np.flatnonzero(~keep)
        block = hinv_g[np.ix_(pruned, pruned)]
        w_s = wg[pruned]
        costs[index] = np.einsum("io,ij,jo->o", w_s, np.linalg.inv(block), w_s)
    best = np.argmin(costs, axis=0)
    return patterns[best].T


def cast_obs_24(
    w: np.ndarray, stats: LayerStats | None, n: int = 2, m: int = 4, damp: float = 0.01, blocksize: int = 128
) -> MaskResult:
    """CAST's exhaustive pattern choice with SparseGPT-style OBS compensation of kept weights.

    Per group, the pattern minimising the *joint* OBS cost (given every earlier column's
    error already folded in) is chosen, then the pruned weights' error is spread over the
    remaining columns. Without calibration data it is magnitude 2:4.
    """
    return sparsegpt_24(w, stats, n=n, m=m, damp=damp, blocksize=blocksize, joint=True)


MASK_METHODS: dict[str, MaskMethod] = {
    "magnitude": magnitude_24,
    "cast": cast_24,
    "wanda": wanda_24,
    "sparsegpt": sparsegpt_24,
    "cast-obs": cast_obs_24,
}


def apply_method(
    name: str, w: np.ndarray, stats: LayerStats | None, n: int = 2, m: int = 4, **kw: object
) -> MaskResult:
    """Dispatch by name so the pipeline / CLI can take the method as a string option."""
    try:
        fn = MASK_METHODS[name]
    except KeyError:
        raise MaskUsageError(
            f"unknown mask method {name!r}; choose one of {', '.join(sorted(MASK_METHODS))}"
        ) from None
    return fn(w, stats, n=n, m=m, **kw)


# --------------------------------------------------------------------------- quality measures


def reconstruction_error(
    w_dense: np.ndarray, w_sparse: np.ndarray, stats: LayerStats | None, *, float32: bool = False
) -> float:
    """Relative output MSE on calibration: ``tr(ΔW G ΔWᵀ) / tr(W G Wᵀ)``.

    Data-free (no gram) it is the relative squared Frobenius error, i.e. G = I.
    ``float32=True`` does the products in float32 (~1e-6 relative, 3-4× faster at K = 3072),
    enough to compare two masks of one layer.
    """
    dtype = np.float32 if float32 else np.float64
    wd = np.asarray(w_dense, dtype=dtype)
    ws = np.asarray(w_sparse, dtype=dtype)
    if wd.shape != ws.shape or wd.ndim != 2:
        raise MaskInputError(f"weights must be 2-D and equal-shaped, got {wd.shape} and {ws.shape}")
    delta = wd - ws
    if float32 and stats is not None and stats.has_gram:
        gram = np.asarray(stats.gram, dtype=np.float32)
        if gram.shape != (wd.shape[1], wd.shape[1]):
            raise MaskInputError(f"gram has shape {gram.shape}, expected K×K for K={wd.shape[1]}")
    else:
        gram = _gram_of(stats, wd.shape[1])
    if gram is None:
        num, den = float(np.sum(delta * delta)), float(np.sum(wd * wd))
    else:
        num = float(np.einsum("ij,ij->", delta @ gram, delta, dtype=np.float64))
        den = float(np.einsum("ij,ij->", wd @ gram, wd, dtype=np.float64))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def cast_cost(w: np.ndarray, mask: np.ndarray, stats: LayerStats | None, m: int = 4) -> float:
    """Σ over rows and groups of ``rᵀ C_g r``, r = dropped part: the proxy CAST minimises."""
    w64 = np.asarray(w, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if w64.ndim != 2 or mask.shape != w64.shape or w64.shape[1] % m:
        raise MaskInputError(f"weight {w64.shape} / mask {mask.shape} do not form groups of {m}")
    out, k = w64.shape
    r = np.where(mask, 0.0, w64).reshape(out, k // m, m)
    gram = _gram_of(stats, k)
    if gram is None:
        return float(np.sum(r * r))
    idx = np.arange(k).reshape(k // m, m)
    blocks = gram[idx[:, :, None], idx[:, None, :]]
    return float(np.einsum("iga,gab,igb->", r, blocks, r, optimize=True))

# ADMM (Boža 2024) lives in its own module; registered here so every name-based caller sees it.
from mpcompile.numerics.admm_prune import admm_24

MASK_METHODS["admm"] = admm_24
