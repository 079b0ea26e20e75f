"""Per-GPU efficiency curves: roofline GEMM times corrected by measured dense and 2:4 kernels.

Why: the roofline assumes both kernels reach datasheet peaks, which no kernel does, and the
2:4 kernels less so (compression metadata, fixed launch and reorder costs). On H100 the
roofline said 1.40× where cuSPARSELt measured 1.01× (ViT-B/16, batch 128). So each kernel kind
gets an affine map from its roofline time to its measured time,

    t_measured ≈ a · t_roofline + c          (a ≥ 1: efficiency 1/a; c: fixed cost in µs)

fitted per GPU and per kind (dense / sparse) by least squares on *relative* error (times span
four decades). The modeled 2:4 speedup of a GEMM is then (a_d·r_d + c_d) / (a_s·r_s + c_s),
and TensorRT, which times both tactics, keeps the faster (≥ 1×). Everything it yields is
still ``modeled``; ``benchmarks/speedup_model_fit.py`` reports its error on every measured point.

Data (only measured kernel times of GEMMs at known shapes are fit):
- H100-SXM: ``benchmarks/results/gpu_audit_nvidia_h100_80gb_hbm3.json`` — our own audit, 57 FP16
  shapes, torch ``F.linear`` (cuBLASLt) vs ``to_sparse_semi_structured`` (cuSPARSELt 0.8),
  CUDA-graph replay (kernel time only).
Published figures we hold (anchors survey, /work/shared/reference/anchors-survey.md) are end to
end (demoBERT on A100: 1.08–1.5× INT8; torchao SAM ViT-h on A100: 1.07–1.10×; ModelOpt Llama-2
on H100 FP8), or lack the GPU (pytorch#111339: 4096×4096 at one token, 0.11×), so none is a
GEMM-level point to fit; they are listed as context by the fit script, not used. A40 and A100
therefore have no curve yet: their rows stay plain roofline, and say so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from mpcompile.trt.model import GpuSpec, LayerShape, gemm_time_us

__all__ = ["CURVES", "EfficiencyCurve", "MeasuredGemm", "calibrated_speedup", "fit_curve", "find_curve"]


@dataclass(frozen=True)
class MeasuredGemm:
    """One measured GEMM: the shape, and the dense and 2:4 kernel medians in µs."""

    shape: LayerShape
    dense_us: float
    sparse_us: float

    @property
    def speedup(self) -> float:
        return self.dense_us / self.sparse_us


@dataclass(frozen=True)
class EfficiencyCurve:
    """Affine roofline→measured maps for one GPU (see the module docstring)."""

    gpu: str
    dense_scale: float
    dense_overhead_us: float
    sparse_scale: float
    sparse_overhead_us: float
    points: int
    source: str
    precision: str = "fp16"

    def times_us(self, layer: LayerShape, spec: GpuSpec) -> tuple[float, float]:
        dense = self.dense_scale * gemm_time_us(layer, spec, False, self.precision) + self.dense_overhead_us
        sparse = self.sparse_scale * gemm_time_us(layer, spec, True, self.precision) + self.sparse_overhead_us
        return dense, sparse

    def kernel_speedup(self, layer: LayerShape, spec: GpuSpec) -> float:
        """2:4 kernel vs dense kernel, modeled (may be < 1: the 2:4 kernel is slower)."""
        dense, sparse = self.times_us(layer, spec)
        return dense / sparse

    def to_dict(self) -> dict:
        return asdict(self)


def _affine_relative(roof: np.ndarray, measured: np.ndarray) -> tuple[float, float]:
    """min Σ ((a·r + c − t) / t)² over a, c: linear least squares with rows scaled by 1/t."""
    design = np.stack([roof / measured, 1.0 / measured], axis=1)
    (a, c), *_ = np.linalg.lstsq(design, np.ones_like(measured), rcond=None)
    return float(a), float(c)


def fit_curve(spec: GpuSpec, points: Sequence[MeasuredGemm], source: str, precision: str = "fp16") -> EfficiencyCurve:
    """Fit the dense and the sparse map of ``spec`` to measured GEMMs (≥ 2 distinct shapes)."""
    if len(points) < 2:
        raise ValueError(f"need at least 2 measured GEMMs to fit {spec.name}, got {len(points)}")
    dense_roof = np.array([gemm_time_us(p.shape, spec, False, precision) for p in points])
    sparse_roof = np.array([gemm_time_us(p.shape, spec, True, precision) for p in points])
    a_d, c_d = _affine_relative(dense_roof, np.array([p.dense_us for p in points]))
    a_s, c_s = _affine_relative(sparse_roof, np.array([p.sparse_us for p in points]))
    return EfficiencyCurve(spec.name, a_d, c_d, a_s, c_s, len(points), source, precision)


# Fitted by ``python benchmarks/speedup_model_fit.py`` (which re-fits and checks these digits).
CURVES: dict[str, EfficiencyCurve] = {
    "H100-SXM": EfficiencyCurve(
        "H100-SXM", 1.4639, 2.9816, 2.2511, 6.9626, 57,
        "benchmarks/results/gpu_audit_nvidia_h100_80gb_hbm3.json (torch 2.11, cuSPARSELt 0.8, FP16)"),
}


def find_curve(gpu: str, precision: str = "fp16") -> EfficiencyCurve | None:
    """The fitted curve for ``gpu`` at ``precision``, or None (then the roofline stands alone)."""
    curve = CURVES.get(gpu)
    return curve if curve is not None and curve.precision == precision else None


def calibrated_speedup(layers: Sequence[LayerShape], spec: GpuSpec, curve: EfficiencyCurve,
                       other_fraction: float) -> dict:
    """End-to-end speedup with the curve's kernel times: a marked layer takes the faster of its
    dense and 2:4 kernels (TensorRT times both), non-GEMM time is ``other_fraction`` of dense."""
    dense = sparse = 0.0
    for layer in layers:
        d, s = curve.times_us(layer, spec)
        dense += d
        sparse += min(d, s) if layer.sparse else d
    other = dense * other_fraction / (1.0 - other_fraction)
    return {"speedup": (dense + other) / (sparse + other), "gemm_speedup": dense / sparse,
            "kind": "modeled", "curve": curve.source, "points": curve.points}
