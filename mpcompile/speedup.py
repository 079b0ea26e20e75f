"""Modeled A40/A100 speedups for a compiled model, from its analysed GEMM shapes.

Why here and not in the TensorRT glue: the model works from the analysis alone (shapes,
MACs, which layers are marked 2:4), so every compile report can carry it, labelled
``modeled``, on a machine with no GPU. Measured numbers come from ``mpcompile build`` or
the torch audit and are never mixed into these.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpcompile.passes.spectral_analysis import LayerAnalysis
from mpcompile.trt.model import LayerShape, gpu_spec, model_speedup, predict_sparse_pick

__all__ = ["REPORT_GPUS", "layer_shapes", "modeled_speedups", "unprofitable_layers"]

REPORT_GPUS = ("A40", "A100-SXM4-80GB")


def _conv_input_elements(layer, m: int, tensor_shapes: dict[str, tuple[int, ...]] | None) -> int:
    """Elements of a conv's input tensor, read once by an implicit-GEMM kernel.

    From the analysed shapes when known; otherwise M·Cin (the output pixel count times the
    input channels: exact for a stride-1 'same' conv, the usual case without shapes).
    """
    value = layer.node.inputs[0] if layer.node.inputs else None
    shape = (tensor_shapes or {}).get(value.name) if value is not None else None
    if shape and all(isinstance(d, int) and d > 0 for d in shape):
        return int(np.prod(shape, dtype=np.int64))
    return m * layer.in_channels * layer.group


def layer_shapes(layers: list[LayerAnalysis], sparse_names: set[str],
                 tensor_shapes: dict[str, tuple[int, ...]] | None = None) -> list[LayerShape]:
    """GEMM problem sizes M×K×N per layer (M = MACs / (K·N): batch × tokens or pixels).

    ``tensor_shapes`` (the analysis's inferred shapes) gives a conv's real input size, so its
    roofline counts the input tensor once rather than the im2col matrix.
    """
    shapes = []
    for analysis in layers:
        layer = analysis.layer
        if not layer.macs:
            continue
        n, k = layer.out_features, layer.reduction
        m = max(1, layer.macs // (n * k))
        elements = _conv_input_elements(layer, m, tensor_shapes) if layer.op_type == "Conv" else None
        shapes.append(LayerShape(layer.name, m, k, n, sparse=analysis.name in sparse_names,
                                 input_elements=elements))
    return shapes


def modeled_speedups(
    layers: list[LayerAnalysis], sparse_names: set[str], gpus: tuple[str, ...] = REPORT_GPUS,
    tensor_shapes: dict[str, tuple[int, ...]] | None = None,
) -> list[dict[str, Any]]:
    """One ``kind="modeled"`` entry per GPU, with per-layer times and the Amdahl bound."""
    shapes = layer_shapes(layers, sparse_names, tensor_shapes)
    if not shapes:
        return []
    return [model_speedup(shapes, gpu_spec(name)).to_dict() for name in gpus]


def unprofitable_layers(layers: list[LayerAnalysis], gpu: str,
                        tensor_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, str]:
    """Eligible layers TensorRT is predicted to run dense on ``gpu`` even if 2:4: name → reason.

    Why: pruning such a layer costs accuracy and buys nothing (TensorRT keeps its dense
    tactic), so ``--only-profitable`` keeps it dense up front. Layers whose MACs are unknown
    cannot be judged and are left to the other rules.
    """
    spec = gpu_spec(gpu)
    eligible = {a.name for a in layers if a.layer.eligible}
    verdicts = {}
    for shape in layer_shapes([a for a in layers if a.name in eligible], eligible, tensor_shapes):
        picked, reason = predict_sparse_pick(shape, spec)
        if not picked:
            verdicts[shape.name] = reason
    return verdicts
