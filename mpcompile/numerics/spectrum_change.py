"""How much 2:4 masking moved a weight's spectrum (seed 003's spectrum-preservation figures)."""

from __future__ import annotations

import numpy as np

from mpcompile.numerics.mp_law import matrix_eigenvalues

__all__ = ["spectrum_change"]


def spectrum_change(
    dense: np.ndarray, sparse: np.ndarray, top_k: int = 8, dense_top: tuple[float, ...] | None = None,
    sketch: bool = False,
) -> dict[str, float | int | str]:
    """Seed 003: relative spectral / Frobenius error and how many top singular values stay within 5 %.

    Singular values come from the Gram eigenvalues of the smaller side (no singular vectors
    are needed), which is several times cheaper than an SVD on large layers. (LAPACK's
    subset eigensolver for only the top k was measured 2× slower here than the full one.)
    ``dense_top`` — the dense weight's largest singular values, when the MP fit already has
    them (permuting channels leaves them unchanged) — saves one of the three solves.

    ``sketch`` (the MP fit was sketched, ``--spectrum sketch``) on a matrix whose smaller side
    is at least ``SKETCH_MIN_SIDE``: the top singular values by randomized subspace iteration
    instead of the full Gram spectrum — on a 4096 × 11008 layer three full 4096² solves were
    most of a 7B compile. The figures then say ``"spectrum": "sketch"``; the top value of the
    (bulk-like, gap-free) difference is biased low by the iteration.
    """
    from mpcompile.numerics.sketch_spectrum import SKETCH_MIN_SIDE, top_singular_values

    # no copies beyond the difference: on a 32000 × 4096 LM head each float32 copy is 0.5 GB
    d = np.asarray(dense, dtype=np.float32)
    sparse = np.asarray(sparse, dtype=np.float32)
    diff = d - sparse
    k = min(top_k, min(d.shape))
    sketch = sketch and min(d.shape) >= SKETCH_MIN_SIDE
    if dense_top is not None and len(dense_top) >= k:
        sd = np.asarray(dense_top, dtype=np.float64)
    elif sketch:
        sd = top_singular_values(d, k)
    else:
        sd = np.sqrt(matrix_eigenvalues(d))[::-1]
    if sketch:
        ss = top_singular_values(sparse, k)
        spectral_diff = float(top_singular_values(diff, 1)[0])
    else:
        ss = np.sqrt(matrix_eigenvalues(sparse))[::-1]
        spectral_diff = float(np.sqrt(matrix_eigenvalues(diff)[-1]))
    within = int(np.sum(np.abs(ss[:k] - sd[:k]) <= 0.05 * np.maximum(sd[:k], 1e-12)))
    return {
        "relative_spectral_error": spectral_diff / max(float(sd[0]), 1e-12),
        "relative_frobenius_error": float(np.linalg.norm(diff) / max(np.linalg.norm(d), 1e-12)),
        "top_k": k,
        "top_k_within_5pct": within,
        **({"spectrum": "sketch"} if sketch else {}),
    }
