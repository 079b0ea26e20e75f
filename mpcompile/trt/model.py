"""Modeled 2:4 speedup: a per-GEMM roofline on datasheet numbers, plus the Amdahl bound.

Why a model: most users decide whether to prune *before* they have the GPU (or TensorRT) at
hand, and the marketing "2×" is what they expect. The model says what the hardware can give at
most for *their* shapes, and every result is labelled ``kind = "modeled"`` with the GPU name so it
is never mistaken for a measurement (DESIGN §1 stage 5, §5).

The model (FP16 operands, FP16/FP32 accumulate; one GEMM ``[M, K] × [K, N]``, M = batch·tokens
rows, K = reduction, N = outputs):

- dense time  = max(2·M·K·N / peak_dense,  2·(X + K·N + M·N) bytes / bandwidth)
- sparse time = max(2·M·K·N / peak_sparse, (2·(X + M·N) + 1.125·K·N) bytes / bandwidth)

  X is the activation input read once: M·K for a GEMM, but for a convolution the input tensor
  N·Cin·H·W, not the im2col matrix M·K (which is kh·kw times larger and never exists in DRAM
  for TensorRT's implicit-GEMM kernels); counting M·K made every 3×3 conv look memory bound.

  The 2:4 weight keeps K·N/2 FP16 values (K·N bytes) plus 2 bits of position metadata per kept
  value (K·N/8 bytes): 1.125·K·N bytes instead of 2·K·N. Activations and outputs are unchanged.
- peaks are the datasheet dense / "with sparsity" FP16 Tensor Core figures; no kernel reaches
  them, so both times are optimistic lower bounds — the *ratio* is what the model is for.
- a layer not marked 2:4 keeps its dense time. With ``apply_pick_prediction`` (default), a
  marked layer that :func:`predict_sparse_pick` expects TensorRT to run dense also keeps its
  dense time (TensorRT times both tactics and keeps the faster one).
- non-GEMM work (norms, softmax, activations, copies) is not sped up by 2:4. Unless the caller
  gives it in µs (``other_us``), it is modeled as ``other_fraction`` of the dense end-to-end time
  (default 0.3): ``other = Σ dense_gemm · f_o / (1 − f_o)``.
- Amdahl bound: with f = the share of dense end-to-end time spent in layers marked 2:4, no 2:4
  kernel (at most 2× on its layer) can give more than ``1 / ((1 − f) + f/2)`` end to end.

Length (~450 lines): the GEMM and conv rooflines, the GPU table and the Amdahl bound are one
model whose terms must stay consistent; the fitted efficiency curve lives in ``efficiency.py``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from mpcompile.errors import UsageError

__all__ = [
    "DEFAULT_OTHER_FRACTION",
    "GPUS",
    "MIN_SPARSE_CHANNELS",
    "PRECISIONS",
    "Precision",
    "SPARSE_WEIGHT_BYTES_PER_ELEMENT",
    "GpuSpec",
    "LayerShape",
    "LayerTiming",
    "ModeledSpeedup",
    "amdahl_bound",
    "find_gpu_spec",
    "gemm_time_us",
    "gpu_spec",
    "model_speedup",
    "precision_spec",
    "predict_sparse_pick",
]

logger = logging.getLogger(__name__)

SPARSE_WEIGHT_BYTES_PER_ELEMENT = 1.0 + 1.0 / 8.0  # half the FP16 values + 2-bit index per kept value
DENSE_BYTES_PER_ELEMENT = 2.0  # FP16
DEFAULT_OTHER_FRACTION = 0.3
MIN_SPARSE_CHANNELS = 256  # NVIDIA staff heuristic (TensorRT#3849, #4065)
_ALIGN = 16  # cuSPARSELt FP16 minimum / multiple (anchors survey §5); a proxy for TensorRT kernels


@dataclass(frozen=True)
class Precision:
    """How one engine precision changes the roofline.

    Attributes:
        bytes_per_element: operand size in DRAM.
        peak_scale: Tensor Core peak relative to the FP16 datasheet figure. On A40/A100/H100/
            H200/L4 the datasheets give TF32 at half and INT8 at twice the FP16 rate.
        sparse_kernels: whether a TensorRT 10+ strongly typed engine of this precision has 2:4
            kernels. FP32 tensors build FP32/TF32 kernels, and TensorRT has no sparse FP32 path
            (builder note; TensorRT developer guide, "Structured Sparsity": FP16/BF16/INT8/FP8).
    """

    name: str
    bytes_per_element: float
    peak_scale: float
    sparse_kernels: bool

    @property
    def sparse_weight_bytes(self) -> float:
        """Half the values plus 2 bits of position metadata per kept value."""
        return self.bytes_per_element / 2.0 + 1.0 / 8.0


PRECISIONS: dict[str, Precision] = {
    p.name: p for p in (
        Precision("fp32", 4.0, 0.5, False),
        Precision("tf32", 4.0, 0.5, False),
        Precision("fp16", 2.0, 1.0, True),
        Precision("bf16", 2.0, 1.0, True),
        Precision("int8", 1.0, 2.0, True),
    )
}


def precision_spec(name: str) -> Precision:
    try:
        return PRECISIONS[name.lower()]
    except KeyError:
        raise UsageError(f"unknown precision '{name}'; known: {', '.join(PRECISIONS)}") from None


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet figures of one GPU.

    Attributes:
        name: short name used in reports (``"A100-SXM4-80GB"``).
        fp16_dense_tflops: peak FP16 Tensor Core TFLOPS, dense.
        fp16_sparse_tflops: the datasheet "with sparsity" figure (2× dense on Ampere/Ada/Hopper).
        bandwidth_gbs: peak DRAM bandwidth in GB/s (10⁹ bytes/s).
        sm: compute capability; sparse tensor cores need ≥ (8, 0).
    """

    name: str
    fp16_dense_tflops: float
    fp16_sparse_tflops: float
    bandwidth_gbs: float
    sm: tuple[int, int] = (8, 0)

    @property
    def has_sparse_tensor_cores(self) -> bool:
        return tuple(self.sm) >= (8, 0) and self.fp16_sparse_tflops > self.fp16_dense_tflops

    @property
    def balance_flop_per_byte(self) -> float:
        """Dense machine balance: arithmetic intensity above which a GEMM is compute bound."""
        return self.fp16_dense_tflops * 1e12 / (self.bandwidth_gbs * 1e9)

    def to_dict(self) -> dict:
        return asdict(self)


# Source: NVIDIA datasheets (FP16 Tensor Core TFLOPS dense | with sparsity; memory bandwidth).
#   A40:            149.7 | 299.4 TFLOPS, 696 GB/s GDDR6         (NVIDIA A40 datasheet)
#   A100 SXM4 40GB: 312 | 624 TFLOPS, 1,555 GB/s HBM2            (NVIDIA A100 datasheet)
#   A100 SXM4 80GB: 312 | 624 TFLOPS, 2,039 GB/s HBM2e           (NVIDIA A100 datasheet)
#   A100 PCIe 80GB: 312 | 624 TFLOPS, 1,935 GB/s HBM2e           (NVIDIA A100 datasheet)
#   H100 SXM5:      989.5 | 1,979 TFLOPS, 3.35 TB/s HBM3         (NVIDIA H100 datasheet)
#   H100 PCIe:      756 | 1,513 TFLOPS, 2 TB/s HBM2e             (NVIDIA H100 datasheet)
#   H200 SXM:       989.5 | 1,979 TFLOPS, 4.8 TB/s HBM3e         (NVIDIA H200 datasheet)
#   L4:             121 | 242 TFLOPS, 300 GB/s GDDR6             (NVIDIA L4 datasheet)
GPUS: dict[str, GpuSpec] = {
    spec.name: spec
    for spec in (
        GpuSpec("A40", 149.7, 299.4, 696.0, (8, 6)),
        GpuSpec("A100-SXM4-40GB", 312.0, 624.0, 1555.0, (8, 0)),
        GpuSpec("A100-SXM4-80GB", 312.0, 624.0, 2039.0, (8, 0)),
        GpuSpec("A100-PCIe-80GB", 312.0, 624.0, 1935.0, (8, 0)),
        GpuSpec("H100-SXM", 989.5, 1979.0, 3350.0, (9, 0)),
        GpuSpec("H100-PCIe", 756.0, 1513.0, 2000.0, (9, 0)),
        GpuSpec("H200", 989.5, 1979.0, 4800.0, (9, 0)),
        GpuSpec("L4", 121.0, 242.0, 300.0, (8, 9)),
    )
}

# Device-name patterns (as torch.cuda.get_device_name / nvidia-smi print them) → table key.
_NAME_RULES: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"\bA40\b", re.IGNORECASE), "A40"),
    (re.compile(r"A100.*PCIE.*80\s*GB|A100.*80\s*GB.*PCIE", re.IGNORECASE), "A100-PCIe-80GB"),
    (re.compile(r"A100.*80\s*GB", re.IGNORECASE), "A100-SXM4-80GB"),
    (re.compile(r"A100", re.IGNORECASE), "A100-SXM4-40GB"),
    (re.compile(r"H100.*PCIE", re.IGNORECASE), "H100-PCIe"),
    (re.compile(r"H100", re.IGNORECASE), "H100-SXM"),
    (re.compile(r"H200", re.IGNORECASE), "H200"),
    (re.compile(r"\bL4\b", re.IGNORECASE), "L4"),
)


def find_gpu_spec(name: str) -> GpuSpec | None:
    """The table entry for a key or a device name (``"NVIDIA A100-SXM4-80GB"``), or None."""
    if name in GPUS:
        return GPUS[name]
    lowered = {key.lower(): spec for key, spec in GPUS.items()}
    if name.lower() in lowered:
        return lowered[name.lower()]
    for pattern, key in _NAME_RULES:
        if pattern.search(name):
            return GPUS[key]
    return None


def gpu_spec(name: str) -> GpuSpec:
    """Like :func:`find_gpu_spec` but a UsageError for an unknown GPU."""
    spec = find_gpu_spec(name)
    if spec is None:
        raise UsageError(f"no datasheet figures for GPU '{name}'; known: {', '.join(GPUS)}")
    return spec


@dataclass(frozen=True)
class LayerShape:
    """One GEMM as ``[m, k] × [k, n]``: m = batch·tokens (or N·Hout·Wout for a conv),
    k = reduction (Cin·kh·kw for a conv), n = outputs. ``sparse``: marked 2:4."""

    name: str
    m: int
    k: int
    n: int
    sparse: bool = True
    input_elements: int | None = None
    """Activation elements read (a conv's input tensor N·Cin·H·W); None: M·K, a plain GEMM."""

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.k * self.n

    @property
    def activation_in(self) -> int:
        return self.m * self.k if self.input_elements is None else self.input_elements

    def dense_bytes(self, element: float = DENSE_BYTES_PER_ELEMENT) -> float:
        return element * (self.activation_in + self.k * self.n + self.m * self.n)

    def sparse_bytes(self, element: float = DENSE_BYTES_PER_ELEMENT,
                     sparse_weight: float = SPARSE_WEIGHT_BYTES_PER_ELEMENT) -> float:
        return element * (self.activation_in + self.m * self.n) + sparse_weight * self.k * self.n

    def intensity(self, element: float = DENSE_BYTES_PER_ELEMENT) -> float:
        """Dense arithmetic intensity, FLOP per byte."""
        return self.flops / self.dense_bytes(element)


def _check_shape(layer: LayerShape) -> None:
    for dim in ("m", "k", "n"):
        value = getattr(layer, dim)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UsageError(f"layer '{layer.name}': {dim} must be a positive integer, got {value!r}")


def gemm_time_us(layer: LayerShape, gpu: GpuSpec, sparse: bool, precision: str = "fp16") -> float:
    """Roofline time in µs of one GEMM, dense or with a 2:4 weight (see the module docstring).

    At a precision without sparse kernels (FP32/TF32) the sparse time is the dense time.
    """
    _check_shape(layer)
    prec = precision_spec(precision)
    sparse = sparse and prec.sparse_kernels
    peak = (gpu.fp16_sparse_tflops if sparse else gpu.fp16_dense_tflops) * 1e12 * prec.peak_scale
    element = prec.bytes_per_element
    nbytes = layer.sparse_bytes(element, prec.sparse_weight_bytes) if sparse else layer.dense_bytes(element)
    return max(layer.flops / peak, nbytes / (gpu.bandwidth_gbs * 1e9)) * 1e6


def amdahl_bound(fraction: float) -> float:
    """``1 / ((1 − f) + f/2)``: the end-to-end ceiling when a share f of the time gets 2× faster."""
    if not 0.0 <= fraction <= 1.0:
        raise UsageError(f"Amdahl fraction must be in [0, 1], got {fraction}")
    return 1.0 / ((1.0 - fraction) + fraction / 2.0)


def predict_sparse_pick(layer: LayerShape, gpu: GpuSpec,
                        min_channels: int = MIN_SPARSE_CHANNELS, precision: str = "fp16") -> tuple[bool, str]:
    """Will TensorRT pick a sparse tactic for this GEMM? A heuristic, with the reason.

    Rules, first failure wins (sources in the anchors survey §2, §5, §8):

    1. marked 2:4 and the GPU has sparse tensor cores (sm ≥ 8.0);
    2. K % 4 == 0 — TensorRT's eligibility rule (groups of 4 along the reduction / input channels);
    3. K and N multiples of 16 — the FP16 alignment sparse kernels need (cuSPARSELt's minimum;
       TensorRT's own kernels are not documented, so this is a proxy);
    4. K and N ≥ ``min_channels`` (256) — NVIDIA staff: sparse wins only when C_in and C_out are
       large (TensorRT#3849, #4065); for a conv, K = Cin·kh·kw, which is why 3×3 beats 1×1;
    5. compute bound at the dense roofline (intensity 2·M·K·N / dense bytes ≥ the GPU's
       balance; a conv's input counted once, see the module docstring): small M (batch·tokens) or small K/N leaves the GEMM memory bound, where the
       sparse kernels' tiling overhead loses (pytorch#111339: 0.11× at one token).
    """
    _check_shape(layer)
    prec = precision_spec(precision)
    if not layer.sparse:
        return False, "not marked 2:4"
    if not prec.sparse_kernels:
        return False, (f"{prec.name.upper()} engine: TensorRT 10+ (strongly typed) has no 2:4 kernels at this "
                       "precision; emit FP16 (--fp16) for a sparse engine")
    if not gpu.has_sparse_tensor_cores:
        return False, f"{gpu.name} (sm{gpu.sm[0]}{gpu.sm[1]}) has no sparse tensor cores (needs sm80+)"
    if layer.k % 4:
        return False, f"K={layer.k} is not a multiple of 4: TensorRT will not treat it as 2:4"
    if layer.k % _ALIGN or layer.n % _ALIGN:
        return False, f"K={layer.k}, N={layer.n} not multiples of {_ALIGN}: no aligned FP16 sparse kernel"
    if min(layer.k, layer.n) < min_channels:
        return False, (f"K={layer.k}, N={layer.n}: below ~{min_channels} channels dense kernels "
                       "usually win (NVIDIA, TensorRT#3849/#4065)")
    intensity = layer.intensity(prec.bytes_per_element)
    balance = gpu.balance_flop_per_byte * prec.peak_scale
    if intensity < balance:
        return False, (f"memory bound: {intensity:.0f} FLOP/B < {balance:.0f} FLOP/B balance of "
                       f"{gpu.name} (M={layer.m} rows); sparse tactics lose at this size")
    gain = gemm_time_us(layer, gpu, False, prec.name) / gemm_time_us(layer, gpu, True, prec.name)
    return True, f"compute bound ({intensity:.0f} ≥ {balance:.0f} FLOP/B); modeled {gain:.2f}× on this GEMM"


@dataclass
class LayerTiming:
    """Modeled time of one GEMM.

    Attributes:
        dense_us: roofline time with dense weights.
        sparse_us: the time the model assigns with 2:4 weights — the sparse roofline when the
            layer is marked and predicted to be picked (or prediction is off), else ``dense_us``.
        roofline_sparse_us: the sparse roofline regardless of the pick prediction.
        predicted_pick / pick_reason: :func:`predict_sparse_pick` (None when not applied).
        bound: ``"compute"`` or ``"memory"`` at the dense roofline.
    """

    name: str
    m: int
    k: int
    n: int
    sparse: bool
    dense_us: float
    sparse_us: float
    roofline_sparse_us: float
    bound: str
    predicted_pick: bool | None = None
    pick_reason: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModeledSpeedup:
    """End-to-end modeled speedup of a model on one GPU (``kind`` is always ``"modeled"``).

    Attributes:
        speedup: dense end-to-end time / 2:4 end-to-end time, non-GEMM time included.
        gemm_speedup: the same over GEMM time only.
        amdahl_bound: ``1/((1−f) + f/2)`` with f = ``sparse_fraction``.
        sparse_fraction: share of dense end-to-end time in layers marked 2:4.
        other_us / other_fraction: non-GEMM time and how it was obtained.
    """

    gpu: str
    per_layer: list[LayerTiming]
    gemm_dense_us: float
    gemm_sparse_us: float
    other_us: float
    total_dense_us: float
    total_sparse_us: float
    speedup: float
    gemm_speedup: float
    sparse_fraction: float
    amdahl_bound: float
    other_fraction: float | None
    pick_prediction: bool
    kind: str = "modeled"
    assumptions: list[str] = field(default_factory=list)
    precision: str = "fp16"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["per_layer"] = [timing.to_dict() for timing in self.per_layer]
        return data


def model_speedup(
    layers: Sequence[LayerShape],
    gpu: GpuSpec | str,
    other_fraction: float = DEFAULT_OTHER_FRACTION,
    other_us: float | None = None,
    apply_pick_prediction: bool = True,
    precision: str = "fp16",
) -> ModeledSpeedup:
    """Model dense vs 2:4 time layer by layer and end to end (see the module docstring).

    Args:
        layers: every GEMM of the model (repeat a shape for every layer that has it).
        gpu: a :class:`GpuSpec` or a name :func:`gpu_spec` knows.
        other_fraction: share of dense end-to-end time outside the GEMMs, in [0, 1).
        other_us: non-GEMM time in µs, when known; overrides ``other_fraction``.
        apply_pick_prediction: marked layers that TensorRT is predicted to run dense keep
            their dense time.
        precision: the engine precision the model will build at (``PRECISIONS``): FP32/TF32
            has no 2:4 kernels, so nothing gets faster there.
    """
    spec = gpu_spec(gpu) if isinstance(gpu, str) else gpu
    prec = precision_spec(precision)
    if not layers:
        raise UsageError("no GEMM layers to model")
    if other_us is None and not 0.0 <= other_fraction < 1.0:
        raise UsageError(f"other_fraction must be in [0, 1), got {other_fraction}")
    if other_us is not None and other_us < 0:
        raise UsageError(f"other_us must be >= 0, got {other_us}")

    timings = []
    for layer in layers:
        dense = gemm_time_us(layer, spec, False, prec.name)
        roof_sparse = gemm_time_us(layer, spec, True, prec.name) if layer.sparse else dense
        bound = ("compute" if layer.intensity(prec.bytes_per_element) >= spec.balance_flop_per_byte * prec.peak_scale
                 else "memory")
        pick, reason = (predict_sparse_pick(layer, spec, precision=prec.name) if apply_pick_prediction and layer.sparse
                        else (None, None))
        effective = roof_sparse if layer.sparse and pick is not False else dense
        timings.append(LayerTiming(layer.name, layer.m, layer.k, layer.n, layer.sparse, dense,
                                   effective, roof_sparse, bound, pick, reason))

    gemm_dense = sum(t.dense_us for t in timings)
    gemm_sparse = sum(t.sparse_us for t in timings)
    if other_us is None:
        other = gemm_dense * other_fraction / (1.0 - other_fraction)
        fraction_used: float | None = other_fraction
    else:
        other = float(other_us)
        fraction_used = None
    total_dense = gemm_dense + other
    total_sparse = gemm_sparse + other
    marked_dense = sum(t.dense_us for t in timings if t.sparse)
    f = marked_dense / total_dense
    assumptions = [
        f"{prec.name.upper()} engine: roofline on datasheet Tensor Core peaks (FP16 figure × {prec.peak_scale:g}) "
        "and DRAM bandwidth (optimistic for both)",
        (f"2:4 weight = {prec.sparse_weight_bytes} bytes/element (values + 2-bit metadata)" if prec.sparse_kernels
         else f"{prec.name.upper()}: no 2:4 kernels in TensorRT 10+ strongly typed builds, so no layer gets faster; "
              "emit FP16 (--fp16) for a sparse engine"),
        (f"non-GEMM time = {other_fraction:.0%} of dense end-to-end time" if other_us is None
         else f"non-GEMM time given: {other:.1f} µs"),
    ]
    if apply_pick_prediction:
        assumptions.append("marked layers predicted to run dense in TensorRT keep their dense time")
    return ModeledSpeedup(
        gpu=spec.name,
        per_layer=timings,
        gemm_dense_us=gemm_dense,
        gemm_sparse_us=gemm_sparse,
        other_us=other,
        total_dense_us=total_dense,
        total_sparse_us=total_sparse,
        speedup=total_dense / total_sparse,
        gemm_speedup=gemm_dense / gemm_sparse,
        sparse_fraction=f,
        amdahl_bound=amdahl_bound(min(1.0, f)),
        other_fraction=fraction_used,
        pick_prediction=apply_pick_prediction,
        assumptions=assumptions,
        precision=prec.name,
    )
