"""Latency samples → the robust summary every measured figure in mpcompile reports.

Why median and p10/p90 rather than mean ± std: GPU timings have a long right tail (clock ramps,
other tenants, the first launch of a kernel); the median is what a user will typically see and
the p10–p90 spread says how much to trust a small difference between dense and sparse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from mpcompile.errors import UsageError

__all__ = ["LatencyStats", "latency_stats"]


@dataclass(frozen=True)
class LatencyStats:
    """Summary of repeated timings, all in milliseconds.

    Attributes:
        median_ms, p10_ms, p90_ms, mean_ms, min_ms: over ``samples`` timings.
        samples: how many timings were summarised (warm-up runs excluded).
        kind: always ``"measured"`` — modeled numbers live in :mod:`mpcompile.trt.model`.
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    samples: int
    kind: str = "measured"

    def to_dict(self) -> dict:
        return asdict(self)


def latency_stats(samples_ms: Sequence[float] | np.ndarray) -> LatencyStats:
    """Summarise timings in ms (UsageError when empty or not finite)."""
    values = np.asarray(samples_ms, dtype=np.float64).ravel()
    if values.size == 0:
        raise UsageError("no latency samples to summarise (iters must be >= 1)")
    if not np.all(np.isfinite(values)):
        raise UsageError("latency samples contain NaN or infinity")
    p10, median, p90 = np.percentile(values, [10.0, 50.0, 90.0])
    return LatencyStats(
        median_ms=float(median),
        p10_ms=float(p10),
        p90_ms=float(p90),
        mean_ms=float(values.mean()),
        min_ms=float(values.min()),
        samples=int(values.size),
    )
