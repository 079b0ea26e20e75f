"""The permutation judge: apply a found channel permutation only if it lowers the output error.

Why a judge beside the search: the search (``numerics/permutation.py``) maximises kept
importance, a proxy; what matters is each consumer's output error under the chosen mask
method, so a permutation is only applied when it lowers that. The masks it computes on
the way are handed to the mask stage, which reuses the chosen ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from mpcompile.numerics.layer_stats import LayerStats
from mpcompile.numerics.masks import PackedMaskResult
from mpcompile.passes.gemm_discovery import GemmLayer
from mpcompile.stages.options import DATA_METHODS

__all__ = ["Judgement", "judge_permutation", "k_permutation", "scores"]


def scores(layer: GemmLayer, stats: LayerStats | None, method: str) -> np.ndarray:
    """Per-entry importance on the ``[rows, Cin]`` channel view the permutation acts on."""
    w = np.abs(layer.matrix().astype(np.float64))
    if stats is not None and stats.has_gram and method in DATA_METHODS:
        w = w * np.sqrt(np.maximum(stats.diagonal(), 0.0))[None, :]
    cin = layer.in_channels
    return w.reshape(-1, cin) if layer.op_type == "Conv" else w


def k_permutation(layer: GemmLayer, perm: np.ndarray) -> np.ndarray:
    """Lift a Cin permutation to the full reduction axis ``(kh, kw, Cin)``."""
    if layer.op_type != "Conv":
        return perm
    positions = layer.reduction // layer.in_channels
    return (np.arange(positions)[:, None] * layer.in_channels + perm[None, :]).ravel()


@dataclass
class Judgement:
    """What masking the consumers of one producer gives with and without a permutation."""

    gain: float | None
    """Relative drop of their calibration output error when permuted (None: no statistics)."""
    permuted_stats: dict[ir.Node, LayerStats] = field(default_factory=dict)
    """Their statistics in the permuted order (compact), to keep if the permutation is applied."""
    identity: dict[str, PackedMaskResult] = field(default_factory=dict)
    permuted: dict[str, PackedMaskResult] = field(default_factory=dict)
    """The mask results of each order by layer: the mask pass reuses the chosen ones."""


def judge_permutation(consumers, perm, stats_by_node, method) -> Judgement:
    """Mask the consumers with and without ``perm`` and compare their output errors."""
    from mpcompile.numerics.masks import apply_method, reconstruction_error

    before = after = 0.0
    judgement = Judgement(None)
    for consumer in consumers:
        stats = stats_by_node.get(consumer.node)
        if stats is None or not stats.has_gram or method not in DATA_METHODS:
            return Judgement(None)
        full = stats.expanded()  # read several times below: rebuild the full matrix once
        w = consumer.matrix()
        kperm = k_permutation(consumer, perm)
        result = apply_method(method, w, full)
        before += reconstruction_error(w, result.weight, full, float32=True)
        judgement.identity[consumer.name] = result.packed(w)
        permuted = full.permuted(kperm)  # compact: no second full matrix
        result = apply_method(method, w[:, kperm], permuted)
        judgement.permuted[consumer.name] = result.packed(w[:, kperm])
        # The permuted layer's error, measured back in the original column order against the
        # full matrix already at hand: the same number, without a permuted copy of it.
        unpermuted = np.empty_like(result.weight)
        unpermuted[:, kperm] = result.weight
        del result
        after += reconstruction_error(w, unpermuted, full, float32=True)
        del full, unpermuted
        judgement.permuted_stats[consumer.node] = permuted
    judgement.gain = (before - after) / before if before > 0 else 0.0
    return judgement
