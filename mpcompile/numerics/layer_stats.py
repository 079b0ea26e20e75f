"""Per-layer calibration statistics: the input second moment ``XᵀX / rows`` every mask method reads.

Why its own module: capture (``io/capture.py``), the permutation judge and every mask
method share it, and it carries its own storage scheme (packed upper triangle, compact
permuted views) that has nothing to do with choosing a mask.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from mpcompile.errors import UnsupportedModelError, UsageError

__all__ = ["LayerStats", "MaskInputError", "MaskUsageError", "upper_row_start"]


class MaskInputError(UnsupportedModelError, ValueError):
    """The weight / statistics cannot be masked as given (shape, dtype, non-finite values)."""


class MaskUsageError(UsageError, ValueError):
    """The mask options are inconsistent (unknown method, bad n:m, bad block size)."""


class LayerStats:
    """Second moment of a layer's input: the only thing every calibration-aware method needs.

    Kept as ``XᵀX / rows`` rather than the activations so that statistics can be accumulated
    batch by batch (:meth:`merged`) and memory stays ``K²`` whatever the calibration size.
    The matrix is symmetric, so statistics held for later (:meth:`compact`) keep only its upper
    triangle: half the memory, which on ViT-B/16 is 270 MB of a compile's peak. Reading
    :attr:`gram` of a compact one rebuilds the full matrix (~0.1 s at K = 3072); work that
    reads it several times takes :meth:`expanded` first.
    """

    __slots__ = ("rows", "_gram", "_upper", "_k")

    def __init__(self, gram: np.ndarray | None, rows: int) -> None:
        self.rows = rows
        self._gram = gram
        self._upper: np.ndarray | None = None
        self._k = 0 if gram is None else int(gram.shape[0])

    @classmethod
    def from_activations(cls, x: np.ndarray) -> LayerStats:
        """Leading axes are flattened into rows: ``[B, T, K]`` token activations are fine."""
        x = np.asarray(x)
        if x.ndim < 2:
            raise MaskInputError(f"activations must be at least 2-D [rows, K], got shape {x.shape}")
        x = x.reshape(-1, x.shape[-1])
        rows, k = x.shape
        if rows == 0:
            raise MaskInputError("activations have no rows: cannot estimate the input covariance")
        gram = np.zeros((k, k), dtype=np.float64)
        step = max(1, (64 * 2**20) // (8 * max(k, 1)))  # convert to float64 in ~64 MB slabs
        for r0 in range(0, rows, step):
            xs = x[r0 : r0 + step].astype(np.float64, copy=False)
            gram += xs.T @ xs
        if not np.all(np.isfinite(gram)):
            raise MaskInputError("activations contain NaN/Inf (or overflow float64)")
        return cls(gram=gram / rows, rows=rows)

    @classmethod
    def data_free(cls) -> LayerStats:
        return cls(gram=None, rows=0)

    @property
    def has_gram(self) -> bool:
        return self._gram is not None or self._upper is not None

    @property
    def k(self) -> int:
        return self._k

    @property
    def gram(self) -> np.ndarray | None:
        """The full ``K×K`` matrix (rebuilt from the upper triangle when compact)."""
        if self._gram is not None or self._upper is None:
            return self._gram
        full = np.zeros((self._k, self._k), self._upper.dtype)
        full[_upper_mask(self._k)] = self._upper
        full += np.triu(full, 1).T
        return full

    @classmethod
    def from_upper(cls, upper: np.ndarray, k: int, rows: int) -> LayerStats:
        """Statistics given as the row-major upper triangle of the ``K×K`` matrix."""
        if upper.shape != (k * (k + 1) // 2,):
            raise MaskInputError(f"an upper triangle of a {k}×{k} matrix has {k * (k + 1) // 2} entries, "
                                 f"got shape {upper.shape}")
        stats = cls(None, rows)
        stats._upper, stats._k = upper, k
        return stats

    @staticmethod
    def upper_of(gram: np.ndarray) -> np.ndarray:
        """The row-major upper triangle of a symmetric matrix (what compact statistics hold)."""
        return gram[_upper_mask(gram.shape[0])]

    def permuted(self, order: np.ndarray) -> LayerStats:
        """Compact statistics of the input with its columns taken in ``order``.

        Built row by row from the full matrix, so no second ``K×K`` matrix is made (at
        K = 4608 that is 85 MB).
        """
        gram = self.gram
        if gram is None:
            return self
        k = self._k
        upper = np.empty(k * (k + 1) // 2, dtype=gram.dtype)
        for i in range(k):
            start = upper_row_start(i, k)
            upper[start : start + k - i] = gram[order[i], order[i:]]
        return LayerStats.from_upper(upper, k, self.rows)

    def compact(self) -> LayerStats:
        """The same statistics holding only the upper triangle (for keeping)."""
        if self._gram is None:
            return self
        return LayerStats.from_upper(self.upper_of(self._gram), self._k, self.rows)

    def expanded(self) -> LayerStats:
        """The same statistics holding the full matrix (for repeated reads)."""
        return self if self._gram is not None or self._upper is None else LayerStats(self.gram, self.rows)

    def diagonal(self) -> np.ndarray:
        """``||X_j||² / rows`` per input column (the Wanda statistic, squared)."""
        if self._gram is not None:
            return np.diag(self._gram).copy()
        if self._upper is None:
            raise MaskInputError("data-free LayerStats has no column norms")
        return self._upper[upper_row_start(np.arange(self._k), self._k)]

    def diagonal_blocks(self, m: int) -> np.ndarray:
        """The ``m×m`` diagonal blocks ``C_g`` as float64 ``[K/m, m, m]``: all CAST reads.

        Taken straight from the stored triangle, so CAST never builds the ``K×K`` matrix.
        """
        k = self._k
        if k % m:
            raise MaskInputError(f"K={k} is not a multiple of m={m}")
        idx = np.arange(k).reshape(k // m, m)
        rows, cols = idx[:, :, None], idx[:, None, :]
        if self._gram is not None:
            return np.asarray(self._gram[rows, cols], dtype=np.float64)
        if self._upper is None:
            raise MaskInputError("data-free LayerStats has no covariance blocks")
        i, j = np.minimum(rows, cols), np.maximum(rows, cols)
        return np.asarray(self._upper[upper_row_start(i, k) + (j - i)], dtype=np.float64)

    @property
    def col_sq_norm(self) -> np.ndarray:
        return self.diagonal()

    def merged(self, other: LayerStats) -> LayerStats:
        """Row-weighted combination, so calibration can be streamed batch by batch."""
        if not self.has_gram:
            return other
        if not other.has_gram:
            return self
        if self.k != other.k:
            raise MaskInputError(f"cannot merge grams of sizes {self.k} and {other.k}")
        total = self.rows + other.rows
        gram = (self.gram * self.rows + other.gram * other.rows) / total
        return LayerStats(gram=gram, rows=total)


def upper_row_start(i: np.ndarray | int, k: int) -> np.ndarray | int:
    """Where row ``i`` of a ``K×K`` upper triangle starts in its row-major packed form."""
    return i * k - i * (i - 1) // 2


@lru_cache(maxsize=4)
def _upper_mask(k: int) -> np.ndarray:
    return np.triu(np.ones((k, k), dtype=bool))
