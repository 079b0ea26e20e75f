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
from mpcompile.trt.efficiency import calibrated_speedup, find_curve
from mpcompile.trt.model import DEFAULT_OTHER_FRACTION, LayerShape, gpu_spec, model_speedup, precision_spec, predict_sparse_pick

__all__ = ["REPORT_GPUS", "layer_shapes", "modeled_speedups", "model_precision", "shape_set_speedups",
           "unprofitable_layers"]

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


def _macs_at(layer, tensor_shapes: dict[str, tuple[int, ...]] | None) -> int | None:
    """MACs at ``tensor_shapes`` (output elements × reduction; None where not inferred there),
    else the analysed count. Never mixes a count at other shapes into a shape set."""
    if tensor_shapes is None:
        return layer.macs
    out = layer.node.outputs[0].name if layer.node.outputs else None
    shape = tensor_shapes.get(out)
    if shape and all(isinstance(d, int) and d > 0 for d in shape):
        return int(np.prod(shape, dtype=np.int64)) * int(layer.reduction)
    return None


def layer_shapes(layers: list[LayerAnalysis], sparse_names: set[str],
                 tensor_shapes: dict[str, tuple[int, ...]] | None = None) -> list[LayerShape]:
    """GEMM problem sizes M×K×N per layer (M = MACs / (K·N): batch × tokens or pixels).

    ``tensor_shapes`` (the analysis's inferred shapes) gives a conv's real input size, so its
    roofline counts the input tensor once rather than the im2col matrix.
    """
    shapes = []
    for analysis in layers:
        layer = analysis.layer
        n, k = layer.out_features, layer.reduction
        macs = _macs_at(layer, tensor_shapes)
        if not macs:
            continue
        m = max(1, macs // (n * k))
        elements = _conv_input_elements(layer, m, tensor_shapes) if layer.op_type == "Conv" else None
        shapes.append(LayerShape(layer.name, m, k, n, sparse=analysis.name in sparse_names,
                                 input_elements=elements))
    return shapes


def modeled_speedups(
    layers: list[LayerAnalysis], sparse_names: set[str], gpus: tuple[str, ...] = REPORT_GPUS,
    tensor_shapes: dict[str, tuple[int, ...]] | None = None,
    precision: str = "fp16",
    shapes_label: str | None = None,
) -> list[dict[str, Any]]:
    """One ``kind="modeled"`` entry per GPU, with per-layer times and the Amdahl bound.

    Each entry states the engine ``precision``, the ``shapes`` it is at, how many of its
    ``layers`` were left out for ``unknown_macs_layers``, and ``calibrated``:
    the same model with the GPU's efficiency curve fitted to measured kernels
    (``mpcompile.trt.efficiency``), or None where we hold no measurements for that GPU. At a precision
    without 2:4 kernels (FP32/TF32) it also carries ``fp16_speedup``: what emitting FP16
    (``--fp16``) would model, so the report can say which precision to emit.
    """
    shapes = layer_shapes(layers, sparse_names, tensor_shapes)
    if not shapes:
        return []
    entries = []
    for name in gpus:
        entry = model_speedup(shapes, gpu_spec(name), precision=precision).to_dict()
        entry["shapes"] = shapes_label
        # layers whose MACs are unknown at these shapes are left out of the model: say how many
        entry["layers"], entry["unknown_macs_layers"] = len(layers), len(layers) - len(shapes)
        curve = find_curve(name, precision)
        entry["calibrated"] = (calibrated_speedup(shapes, gpu_spec(name), curve, DEFAULT_OTHER_FRACTION)
                               if curve else None)
        if not precision_spec(precision).sparse_kernels:
            fp16 = model_speedup(shapes, gpu_spec(name), precision="fp16")
            entry["fp16_speedup"] = fp16.speedup
        entries.append(entry)
    return entries


def shape_set_speedups(
    analysis, sparse_names: set[str], specs: list, precision: str = "fp16",
    gpus: tuple[str, ...] = REPORT_GPUS,
) -> list[dict[str, Any]]:
    """Modeled speedups at several shape sets (``--dim batch=1,8,32``): one row per set and GPU.

    The spectral analysis is done once; only shape inference is redone per set, since the
    MAC count and every roofline depend on M (batch × tokens) alone.
    """
    from mpcompile.io.shapes import infer_static_shapes

    rows: list[dict[str, Any]] = []
    for spec in specs:
        same = spec == analysis.shape_spec
        shapes = analysis.shapes if same else infer_static_shapes(analysis.loaded.proto, spec)
        if same:  # the analysis inferred these: state them as it does
            spec.defaulted, spec.inferred = list(analysis.shape_spec.defaulted), analysis.shape_spec.inferred
        rows += modeled_speedups(analysis.result.layers, sparse_names, gpus, shapes, precision, spec.describe())
    return rows


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


def model_precision(model) -> str:
    """The engine precision a strongly typed TensorRT build of ``model`` (onnx_ir) runs its GEMMs at.

    INT8 when a GEMM weight goes through DequantizeLinear, FP16/BF16 when stored or cast so,
    else FP32 (TF32 kernels at most: no 2:4 gain).
    """
    import onnx_ir as ir

    from mpcompile.passes.gemm_discovery import discover_gemms

    found = set()
    for layer in discover_gemms(model):
        if any(n.op_type == "DequantizeLinear" for n in layer.weight.chain):
            found.add("int8")
            continue
        dtypes = {layer.weight.stored_tensor().dtype}
        dtypes |= {n.attributes["to"].as_int() for n in layer.weight.chain if n.op_type == "Cast" and "to" in n.attributes}
        if ir.DataType.FLOAT16 in dtypes or int(ir.DataType.FLOAT16) in dtypes:
            found.add("fp16")
        elif ir.DataType.BFLOAT16 in dtypes or int(ir.DataType.BFLOAT16) in dtypes:
            found.add("bf16")
        else:
            found.add("fp32")
    for name in ("fp16", "bf16", "int8"):
        if name in found:
            return name
    return "fp32"
