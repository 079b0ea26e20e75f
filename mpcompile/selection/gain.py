"""What making one layer 2:4 buys: modeled µs saved on a named GPU, or MACs without one.

Why µs and not the speedup ratio: the modeled end-to-end time is a sum over layers plus a
fixed non-GEMM share (``trt/model.py``), so the time one layer saves is independent of which
others are sparse and the layer choice can add gains. Always at FP16, the precision TensorRT
has 2:4 kernels for: an FP32 output gains nothing anywhere, which says "emit FP16", not
"choose no layer" (the report notes it).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LayerGain", "layer_gains", "modeled_total_speedup", "GAIN_PRECISION"]

GAIN_PRECISION = "fp16"


@dataclass(frozen=True)
class LayerGain:
    gain: float  # µs saved (modeled) on the GPU, or MACs without a GPU
    reason: str


def layer_gains(layers, names: set[str], gpu: str | None, tensor_shapes=None) -> dict[str, LayerGain]:
    """Gain of each layer in ``names`` (LayerAnalysis list ``layers``, analysed ``tensor_shapes``)."""
    chosen = [a for a in layers if a.name in names]
    if gpu is None:
        out = {}
        for a in chosen:
            macs = a.layer.macs if a.layer.macs is not None else a.layer.out_features * a.layer.reduction
            out[a.name] = LayerGain(float(macs), f"{macs} MACs" + ("" if a.layer.macs is not None
                                                                  else " (parameter count: MACs unknown)"))
        return out
    from mpcompile.trt.model import gemm_time_us, gpu_spec, predict_sparse_pick
    from mpcompile.trt.speedup import layer_shapes

    spec = gpu_spec(gpu)
    out = {a.name: LayerGain(0.0, "MACs unknown at the analysed shapes: gain cannot be modeled") for a in chosen}
    for shape in layer_shapes(chosen, names, tensor_shapes):
        picked, why = predict_sparse_pick(shape, spec, precision=GAIN_PRECISION)
        if not picked:
            out[shape.name] = LayerGain(0.0, f"predicted to run dense on {spec.name}: {why}")
            continue
        saved = (gemm_time_us(shape, spec, False, GAIN_PRECISION) - gemm_time_us(shape, spec, True, GAIN_PRECISION))
        out[shape.name] = LayerGain(saved, f"{saved:.3g} µs saved on {spec.name} (modeled, FP16; {why})")
    return out


def modeled_total_speedup(layers, sparse: set[str], gpu: str, tensor_shapes=None) -> float | None:
    """End-to-end modeled speedup on ``gpu`` at FP16 with ``sparse`` 2:4 (None: nothing to model)."""
    from mpcompile.trt.model import model_speedup
    from mpcompile.trt.speedup import layer_shapes

    shapes = layer_shapes(list(layers), sparse, tensor_shapes)
    return model_speedup(shapes, gpu, precision=GAIN_PRECISION).speedup if shapes else None
