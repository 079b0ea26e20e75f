"""Measured 2:4 GEMM latency with torch (cuSPARSELt / CUTLASS) on GPUs without TensorRT.

Why: a GPU is often available where TensorRT is not (a notebook, a CI runner with a CUDA torch
wheel). ``torch.sparse.to_sparse_semi_structured`` runs the same sparse tensor cores through
cuSPARSELt (or CUTLASS when cuSPARSELt is not built in), so timing ``F.linear`` dense vs 2:4 on
the model's own GEMM shapes gives a *measured* per-layer speedup — not TensorRT's tactic choice,
but the kernel-level answer to "do my shapes gain anything?". torch is imported lazily.

Timing: CUDA events around ``inner`` back-to-back calls (so the event overhead does not swamp a
few-µs GEMM), ``warmup`` untimed samples, then ``iters`` samples; median / p10 / p90 per call.
Each layer's sparse output is checked against the dense one (the weight is already 2:4, so both
compute the same product up to FP16 rounding); a shape the sparse backend rejects is recorded as
an error for that layer instead of failing the audit.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from mpcompile.errors import BackendUnavailableError, OptionalDependencyError, UsageError
from mpcompile.trt.stats import LatencyStats, latency_stats

__all__ = ["AuditLayer", "TorchAudit", "audit_linear_layers", "cuda_environment", "is_24_along_rows"]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "cusparselt", "cutlass")


def is_24_along_rows(weight: np.ndarray) -> bool:
    """Every group of 4 consecutive entries of every row holds at most 2 nonzeros."""
    if weight.ndim != 2 or weight.shape[1] % 4:
        return False
    groups = (weight.reshape(weight.shape[0], -1, 4) != 0).sum(axis=2)
    return bool(np.all(groups <= 2))


@dataclass
class AuditLayer:
    """One GEMM ``x[M, K] @ W[N, K]ᵀ`` timed dense and 2:4.

    Attributes:
        rows: M (batch·tokens); in_features: K; out_features: N.
        dense / sparse: latency per call (sparse is None when the backend rejected the shape).
        speedup: dense median / sparse median.
        backend: ``"cuSPARSELt"`` or ``"CUTLASS"`` — which 2:4 kernel library ran.
        max_abs_diff: largest |sparse − dense| output difference (FP16 rounding only).
        error: why the sparse path could not run, when it could not.
    """

    name: str
    rows: int
    in_features: int
    out_features: int
    dense: LatencyStats
    sparse: LatencyStats | None
    speedup: float | None
    backend: str | None
    max_abs_diff: float | None = None
    error: str | None = None
    timing: str = "eager"  # "cuda-graph" (kernels only) or "eager" (includes host dispatch)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["dense"] = self.dense.to_dict()
        data["sparse"] = self.sparse.to_dict() if self.sparse else None
        return data


@dataclass
class TorchAudit:
    """All layers of one audit plus the environment they ran in (``kind = "measured"``)."""

    layers: list[AuditLayer]
    environment: dict[str, Any]
    warmup: int
    iters: int
    inner: int
    kind: str = "measured"
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "environment": self.environment, "warmup": self.warmup,
                "iters": self.iters, "inner": self.inner, "notes": self.notes,
                "layers": [layer.to_dict() for layer in self.layers]}


def _import_torch() -> Any:
    try:
        import torch  # noqa: PLC0415 - lazy by design
    except ImportError:
        raise OptionalDependencyError("torch", "torch", "The measured torch 2:4 audit") from None
    return torch


def _require_cuda(torch: Any) -> None:
    if not torch.cuda.is_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else "no visible GPU"
        raise BackendUnavailableError(
            f"CUDA is not available ({build}, torch {torch.__version__}): the measured 2:4 audit needs "
            "an NVIDIA GPU with sparse tensor cores (sm80+); use the modeled speedup instead")
    major, minor = torch.cuda.get_device_capability(0)
    if (major, minor) < (8, 0):
        raise BackendUnavailableError(
            f"{torch.cuda.get_device_name(0)} is sm{major}{minor}: 2:4 sparse tensor cores need sm80+")


def cuda_environment() -> dict[str, Any]:
    """GPU name, capability and library versions (raises like the audit when CUDA is missing)."""
    torch = _import_torch()
    _require_cuda(torch)
    major, minor = torch.cuda.get_device_capability(0)
    cusparselt = None
    backend_mod = getattr(torch.backends, "cusparselt", None)
    if backend_mod is not None and hasattr(backend_mod, "is_available"):
        try:
            cusparselt = backend_mod.version() if backend_mod.is_available() else None
        except Exception:  # noqa: BLE001 - informational only
            cusparselt = None
    return {
        "gpu": torch.cuda.get_device_name(0),
        "compute_capability": f"{major}.{minor}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cusparselt": cusparselt,
    }


def _to_semi_structured(torch: Any, weight: Any, backend: str) -> tuple[Any, str]:
    """Compress ``weight``; cuSPARSELt first (``auto``), CUTLASS as the fallback."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured  # noqa: PLC0415

    order = {"auto": (False, True), "cusparselt": (False,), "cutlass": (True,)}[backend]
    previous = SparseSemiStructuredTensor._FORCE_CUTLASS
    errors = []
    try:
        for force_cutlass in order:
            SparseSemiStructuredTensor._FORCE_CUTLASS = force_cutlass
            try:
                return to_sparse_semi_structured(weight), "CUTLASS" if force_cutlass else "cuSPARSELt"
            except (RuntimeError, ValueError, NotImplementedError) as exc:
                errors.append(f"{'CUTLASS' if force_cutlass else 'cuSPARSELt'}: {str(exc).splitlines()[0]}")
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = previous
    raise RuntimeError("; ".join(errors))


def _time_call(torch: Any, fn: Any, warmup: int, iters: int, inner: int) -> LatencyStats:
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    for _ in range(warmup * inner):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(iters):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return latency_stats(samples)


def _time_graph(torch: Any, fn: Any, warmup: int, iters: int, inner: int) -> LatencyStats | None:
    """Time ``inner`` calls replayed from one CUDA graph: kernels only, no host-side work.

    Why: ``to_sparse_semi_structured`` dispatches through a tensor subclass and (for
    cuSPARSELt) sets up a matmul plan on the host at every call, ~1 ms regardless of size;
    eager timing then measures Python, not the sparse tensor cores. A deployed engine
    (TensorRT, CUDA graphs) pays that setup once. Returns None when capture fails.
    """
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
    except Exception as exc:  # capture support differs by backend and torch version
        logger.info("CUDA graph capture failed (%s); timing eagerly", exc)
        torch.cuda.synchronize()
        return None
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(iters):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return latency_stats(samples)


def _time_best(torch: Any, fn: Any, warmup: int, iters: int, inner: int, graphs: bool) -> tuple[LatencyStats, str]:
    if graphs:
        stats = _time_graph(torch, fn, warmup, iters, inner)
        if stats is not None:
            return stats, "cuda-graph"
    return _time_call(torch, fn, warmup, iters, inner), "eager"


def audit_linear_layers(
    layers: Sequence[tuple[str, np.ndarray, int]],
    warmup: int = 10,
    iters: int = 50,
    inner: int = 10,
    backend: str = "auto",
    seed: int = 0,
    graphs: bool = True,
) -> TorchAudit:
    """Time ``F.linear(x, W)`` dense vs ``to_sparse_semi_structured(W)`` on the current GPU.

    Args:
        layers: ``(name, weight [out, in] 2:4 along ``in``, rows M)``; weights are cast to FP16.
        warmup / iters / inner: untimed samples, timed samples, calls per sample.
        backend: ``"auto"`` (cuSPARSELt, else CUTLASS), ``"cusparselt"`` or ``"cutlass"``.
        seed: for the random FP16 activations.
        graphs: time CUDA-graph replays (kernel time; falls back to eager per layer when
            capture fails — the layer's ``timing`` field says which).

    Raises OptionalDependencyError without torch, BackendUnavailableError without CUDA (sm80+),
    UsageError for a weight that is not 2-D 2:4 along its input dimension.
    """
    if backend not in BACKENDS:
        raise UsageError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if warmup < 0 or iters < 1 or inner < 1:
        raise UsageError("need warmup >= 0, iters >= 1 and inner >= 1")
    for name, weight, rows in layers:
        weight = np.asarray(weight)
        if weight.ndim != 2 or not is_24_along_rows(weight):
            raise UsageError(f"layer '{name}': weight {weight.shape} is not 2:4 along its input (last) axis")
        if int(rows) < 1:
            raise UsageError(f"layer '{name}': rows must be >= 1")
    torch = _import_torch()
    _require_cuda(torch)
    functional = torch.nn.functional
    environment = cuda_environment()
    generator = torch.Generator(device="cuda").manual_seed(seed)
    results: list[AuditLayer] = []
    for name, weight, rows in layers:
        w = torch.from_numpy(np.ascontiguousarray(np.asarray(weight, dtype=np.float16))).cuda()
        out_features, in_features = w.shape
        x = torch.randn((int(rows), in_features), generator=generator, device="cuda", dtype=torch.float16)
        with torch.inference_mode():
            dense_stats, dense_mode = _time_best(torch, lambda: functional.linear(x, w), warmup, iters, inner, graphs)
            reference = functional.linear(x, w)
            sparse_stats = backend_name = diff = error = None
            sparse_mode = dense_mode
            try:
                w_sparse, backend_name = _to_semi_structured(torch, w, backend)
                result = functional.linear(x, w_sparse)
                diff = float((result.float() - reference.float()).abs().max().item())
                sparse_stats, sparse_mode = _time_best(
                    torch, lambda: functional.linear(x, w_sparse), warmup, iters, inner, graphs
                )
                if sparse_mode != dense_mode:  # compare like with like
                    dense_stats, dense_mode = _time_call(torch, lambda: functional.linear(x, w), warmup, iters, inner), "eager"
                    sparse_stats, sparse_mode = _time_call(
                        torch, lambda: functional.linear(x, w_sparse), warmup, iters, inner
                    ), "eager"
            except RuntimeError as exc:
                error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                logger.warning("layer %s (%dx%d, %d rows): 2:4 path failed: %s",
                               name, out_features, in_features, rows, error)
        speedup = dense_stats.median_ms / sparse_stats.median_ms if sparse_stats else None
        results.append(AuditLayer(name, int(rows), int(in_features), int(out_features), dense_stats,
                                  sparse_stats, speedup, backend_name, diff, error, dense_mode))
        del w, x
    torch.cuda.empty_cache()
    return TorchAudit(layers=results, environment=environment, warmup=warmup, iters=iters, inner=inner,
                      notes=["F.linear dense vs torch.sparse.to_sparse_semi_structured (kernel level, "
                             "not TensorRT's tactic choice)"])
