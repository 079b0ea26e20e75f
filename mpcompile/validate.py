"""Dense vs sparse on the same inputs: output drift, agreement, accuracy and certificate.

The margin certificate (seed 001): a sample whose dense top-1 margin exceeds
``2·‖z_sparse − z_dense‖∞`` provably keeps its prediction; we count those samples. This is
exact on the samples measured (it uses the realised logit change), not a bound for unseen
inputs — the report says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["OutputComparison", "compare_outputs", "relative_drift"]


@dataclass
class OutputComparison:
    """How far the sparse model's first output moved from the dense one.

    Attributes:
        max_abs_error, mean_abs_error: over all output elements.
        relative_l2: mean over samples of ‖z_s − z_d‖₂ / ‖z_d‖₂ (the drift budget unit).
        cosine_similarity: mean over samples of cos(z_s, z_d).
        top1_agreement: share of samples with the same argmax (logits-like outputs only).
        certified: samples whose dense margin > 2‖z_s − z_d‖∞ (prediction provably kept).
        dense_accuracy, sparse_accuracy: when labels were given.
    """

    samples: int
    max_abs_error: float
    mean_abs_error: float
    relative_l2: float
    cosine_similarity: float
    top1_agreement: float | None = None
    certified: int | None = None
    certified_fraction: float | None = None
    dense_accuracy: float | None = None
    sparse_accuracy: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def relative_drift(dense: np.ndarray, sparse: np.ndarray) -> float:
    d = dense.reshape(dense.shape[0], -1).astype(np.float64)
    s = sparse.reshape(sparse.shape[0], -1).astype(np.float64)
    norms = np.linalg.norm(d, axis=1)
    return float(np.mean(np.linalg.norm(s - d, axis=1) / np.maximum(norms, 1e-12)))


def compare_outputs(dense: np.ndarray, sparse: np.ndarray, labels: np.ndarray | None = None) -> OutputComparison:
    """Compare one output tensor ``[samples, ...]`` of the dense and the sparse model."""
    d = dense.reshape(dense.shape[0], -1).astype(np.float64)
    s = sparse.reshape(sparse.shape[0], -1).astype(np.float64)
    diff = np.abs(s - d)
    cos = np.sum(d * s, axis=1) / np.maximum(np.linalg.norm(d, axis=1) * np.linalg.norm(s, axis=1), 1e-12)
    result = OutputComparison(
        samples=int(d.shape[0]),
        max_abs_error=float(diff.max(initial=0.0)),
        mean_abs_error=float(diff.mean()) if diff.size else 0.0,
        relative_l2=relative_drift(dense, sparse),
        cosine_similarity=float(cos.mean()),
    )
    if dense.ndim == 2 and dense.shape[1] > 1:  # logits-like
        top_d, top_s = d.argmax(axis=1), s.argmax(axis=1)
        result.top1_agreement = float(np.mean(top_d == top_s))
        ordered = np.sort(d, axis=1)
        margin = ordered[:, -1] - ordered[:, -2]
        certified = margin > 2.0 * diff.max(axis=1)
        result.certified = int(certified.sum())
        result.certified_fraction = float(certified.mean())
        if labels is not None and len(labels) == d.shape[0]:
            result.dense_accuracy = float(np.mean(top_d == labels))
            result.sparse_accuracy = float(np.mean(top_s == labels))
    return result
