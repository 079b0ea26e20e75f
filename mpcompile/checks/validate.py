"""Dense vs sparse on the same inputs: output drift, agreement, accuracy and certificate.

The margin certificate (seed 001): a sample whose dense top-1 margin exceeds
``2·‖z_sparse − z_dense‖∞`` provably keeps its prediction; we count those samples. This is
exact on the samples measured (it uses the realised logit change), not a bound for unseen
inputs — the report says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["OutputComparison", "compare_all_outputs", "compare_outputs", "degenerate_reason", "relative_drift"]


@dataclass
class OutputComparison:
    """How far the sparse model's first output moved from the dense one (``others``: the
    remaining outputs, each compared the same way).

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
    output: str | None = None  # graph output name
    degenerate: str | None = None  # why the figures mean nothing (dense output ~constant / ~0)
    others: list[OutputComparison] = field(default_factory=list)  # the remaining graph outputs

    @property
    def all_outputs(self) -> list[OutputComparison]:
        return [self, *self.others]

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


# Relative spread below which a dense output is treated as constant: drift and cosine of
# such an output measure rounding noise, not the model (seen: a detector's ~1e-8 scores on
# N(0,1) input reported "cosine 0.0000").
DEGENERATE_RELATIVE_SPREAD = 1e-6
DEGENERATE_ABS = 1e-6


def degenerate_reason(dense: np.ndarray) -> str | None:
    """Why comparing against ``dense`` would be meaningless, or None when it is not."""
    d = np.asarray(dense, dtype=np.float64)
    if d.size == 0:
        return "the dense output is empty"
    if not np.all(np.isfinite(d)):
        return "the dense output holds NaN/Inf"
    scale = float(np.abs(d).max())
    if scale < DEGENERATE_ABS:
        return f"the dense output is ~0 on this data (max |value| {scale:.1e})"
    if d.size > 1 and float(d.max() - d.min()) <= DEGENERATE_RELATIVE_SPREAD * scale:
        return f"the dense output is constant on this data (value {float(d.flat[0]):.4g})"
    return None


def compare_all_outputs(names: list[str], dense: list[np.ndarray], sparse: list[np.ndarray],
                        labels: np.ndarray | None = None) -> OutputComparison:
    """Compare every graph output; the first one's figures lead, the rest are in ``others``.

    Each comparison's ``degenerate`` says when its dense values make the figures meaningless.
    """
    results = []
    for i, (d, s) in enumerate(zip(dense, sparse, strict=True)):
        name = names[i] if i < len(names) else f"output {i}"
        if not np.issubdtype(np.asarray(d).dtype, np.floating):  # ids/indices: exact match only
            d = np.asarray(d).astype(np.float64)
            s = np.asarray(s).astype(np.float64)
        if d.ndim == 0:
            d, s = d.reshape(1, 1), np.asarray(s).reshape(1, 1)
        comparison = compare_outputs(d, s, labels if i == 0 else None)
        comparison.output = name
        comparison.degenerate = degenerate_reason(d)
        results.append(comparison)
    first, rest = results[0], results[1:]
    first.others = rest
    return first
