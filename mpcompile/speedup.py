"""Modeled A40/A100 speedups for a compiled model, from its analysed GEMM shapes.

Why here and not in the TensorRT glue: the model works from the analysis alone (shapes,
MACs, which layers are marked 2:4), so every compile report can carry it, labelled
``modeled``, on a machine with no GPU. Measured numbers come from ``mpcompile build`` or
the torch audit and are never mixed into these.
"""

from __future__ import annotations

from typing import Any

from mpcompile.passes.spectral_analysis import LayerAnalysis
from mpcompile.trt.model import LayerShape, gpu_spec, model_speedup, predict_sparse_pick

__all__ = ["REPORT_GPUS", "layer_shapes", "modeled_speedups", "unprofitable_layers"]

REPORT_GPUS = ("A40", "A100-SXM4-80GB")


def layer_shapes(layers: list[LayerAnalysis], sparse_names: set[str]) -> list[LayerShape]:
    """GEMM problem sizes M×K×N per layer (M = MACs / (K·N): batch × tokens or pixels)."""
    shapes = []
    for analysis in layers:
        layer = analysis.layer
        if not layer.macs:
            continue
        n, k = layer.out_features, layer.reduction
        m = max(1, layer.macs // (n * k))
        shapes.append(LayerShape(layer.name, m, k, n, sparse=analysis.name in sparse_names))
    return shapes


def modeled_speedups(
    layers: list[LayerAnalysis], sparse_names: set[str], gpus: tuple[str, ...] = REPORT_GPUS
) -> list[dict[str, Any]]:
    """One ``kind="modeled"`` entry per GPU, with per-layer times and the Amdahl bound."""
    shapes = layer_shapes(layers, sparse_names)
    if not shapes:
        return []
    return [model_speedup(shapes, gpu_spec(name)).to_dict() for name in gpus]


def unprofitable_layers(layers: list[LayerAnalysis], gpu: str) -> dict[str, str]:
    """Eligible layers TensorRT is predicted to run dense on ``gpu`` even if 2:4: name → reason.

    Why: pruning such a layer costs accuracy and buys nothing (TensorRT keeps its dense
    tactic), so ``--only-profitable`` keeps it dense up front. Layers whose MACs are unknown
    cannot be judged and are left to the other rules.
    """
    spec = gpu_spec(gpu)
    eligible = {a.name for a in layers if a.layer.eligible}
    verdicts = {}
    for shape in layer_shapes([a for a in layers if a.name in eligible], eligible):
        picked, reason = predict_sparse_pick(shape, spec)
        if not picked:
            verdicts[shape.name] = reason
    return verdicts
