"""What we ask TensorRT for, as Polygraphy loaders that are made but not called.

Why apart from the build: every choice here — strong typing and precision flags from the ONNX
dtypes, ``sparse_weights``, one optimisation profile from ``--profile``, the timing cache,
refusing dynamic inputs without a profile (Polygraphy would quietly build them at 1) — can be
checked without TensorRT or a GPU by reading the loaders' attributes; Polygraphy imports
TensorRT only when a loader runs. :mod:`mpcompile.trt.builder` runs them.

Typing: TensorRT 11 builds every network strongly typed (the ONNX dtypes decide the precision
and ``BuilderFlag.FP16`` is gone); TensorRT 10 offers it as a network flag. ``strongly_typed=None``
resolves to True on TensorRT ≥ 11, and on TensorRT 10 when the ONNX file already stores FP16
weights; the FP16 builder flag is set only for weakly typed builds. TF32 is left on where the
flag exists (TensorRT's own default, which Polygraphy's ``CreateConfig`` would otherwise clear).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpcompile.errors import BackendUnavailableError, OptionalDependencyError, UsageError

__all__ = ["BuildConfig", "BuildPlan", "ShapeProfile", "TrtCaps", "import_polygraphy_trt",
           "parse_profile_spec", "plan_build"]


def import_polygraphy_trt() -> Any:
    """``polygraphy.backend.trt`` (which itself imports TensorRT only when a loader runs)."""
    try:
        from polygraphy.backend import trt as poly_trt
    except ImportError:
        raise OptionalDependencyError("polygraphy", "gpu", "building TensorRT engines") from None
    return poly_trt


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ShapeProfile:
    """min / opt / max shape of one dynamic input (one TensorRT optimisation profile entry)."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def _dims(text: str, spec: str) -> tuple[int, ...]:
    parts = [p for p in re.split(r"[x,]", text.strip()) if p != ""]
    if not parts or not all(p.isdigit() for p in parts):
        raise UsageError(f"--profile '{spec}': '{text}' is not a shape like 1x3x224x224")
    return tuple(int(p) for p in parts)


def parse_profile_spec(spec: str) -> ShapeProfile:
    """``name:min,opt,max`` (shapes written ``8x128``) or ``name:shape`` → ShapeProfile.

    A spec with no ``x`` at all is one static shape with comma-separated dims, as
    ``mpcompile --shape input:1,3,224,224`` accepts; so rank-1 profiles are written ``4x,8x,16x``.
    """
    name, sep, rest = spec.strip().rpartition(":")
    if not sep or not name or not rest:
        raise UsageError(f"--profile '{spec}': expected NAME:MIN,OPT,MAX (e.g. input:1x128,8x128,32x128)")
    if "x" not in rest:
        shape = _dims(rest, spec)
        return ShapeProfile(name, shape, shape, shape)
    parts = rest.split(",")
    if len(parts) == 1:
        shape = _dims(parts[0], spec)
        return ShapeProfile(name, shape, shape, shape)
    if len(parts) != 3:
        raise UsageError(f"--profile '{spec}': give one shape or three (min,opt,max), got {len(parts)}")
    lo, opt, hi = (_dims(p, spec) for p in parts)
    if not len(lo) == len(opt) == len(hi):
        raise UsageError(f"--profile '{spec}': min, opt and max must have the same rank")
    if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
        raise UsageError(f"--profile '{spec}': need min <= opt <= max in every dimension")
    return ShapeProfile(name, lo, opt, hi)


@dataclass
class BuildConfig:
    """How to build one engine.

    Attributes:
        sparse: ask for ``BuilderFlag.SPARSE_WEIGHTS`` (the ``trtexec --sparsity=enable`` switch).
        fp16: allow FP16 kernels in a weakly typed build (ignored when strongly typed).
        strongly_typed: None = automatic (see the module docstring).
        profiles: dynamic-input shapes, e.g. ``[parse_profile_spec("input:1x128,8x128,32x128")]``
            or the strings themselves; all go into one optimisation profile.
        timing_cache: file to read the timing cache from and write it back to (faster rebuilds,
            and dense/sparse builds that time kernels under the same conditions).
        workspace_bytes: workspace memory-pool limit; None keeps TensorRT's default.
        verbose_log: capture VERBOSE records too (large: every tactic timed).
    """

    sparse: bool = True
    fp16: bool = True
    strongly_typed: bool | None = None
    profiles: list[ShapeProfile | str] = field(default_factory=list)
    timing_cache: str | Path | None = None
    workspace_bytes: int | None = None
    verbose_log: bool = False

    def shape_profiles(self) -> list[ShapeProfile]:
        return [p if isinstance(p, ShapeProfile) else parse_profile_spec(p) for p in self.profiles]


@dataclass(frozen=True)
class TrtCaps:
    """What the installed TensorRT offers that changes the plan (read once from the module)."""

    version: str
    strongly_typed_flag: bool
    fp16_flag: bool
    tf32_flag: bool

    @property
    def major(self) -> int:
        match = re.match(r"(\d+)", self.version)
        return int(match.group(1)) if match else 0

    @classmethod
    def of(cls, trt: Any) -> TrtCaps:
        flags = trt.BuilderFlag
        return cls(str(trt.__version__), hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"),
                   hasattr(flags, "FP16"), hasattr(flags, "TF32"))


@dataclass
class BuildPlan:
    """The Polygraphy loaders for one build, not yet called, and the choices behind them."""

    network: Any  # polygraphy NetworkFromOnnxPath
    config: Any  # polygraphy CreateConfig (or PostprocessConfig around it)
    strongly_typed: bool
    fp16_flag: bool
    notes: list[str] = field(default_factory=list)


def _onnx_facts(onnx_path: Path) -> tuple[set[int], dict[str, list[Any]]]:
    """Initializer dtypes and the graph inputs' dims (external data is not loaded)."""
    import onnx  # core dependency

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {init.name for init in model.graph.initializer}
    dims = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        shape = value.type.tensor_type.shape
        dims[value.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
                            for d in shape.dim]
    return {init.data_type for init in model.graph.initializer}, dims


def _check_profiles(inputs: dict[str, list[Any]], profiles: list[ShapeProfile]) -> None:
    """Every dynamic input needs a profile: Polygraphy would quietly build it at 1."""
    unknown = sorted({p.name for p in profiles} - set(inputs))
    if unknown:
        raise UsageError(f"--profile names unknown input(s) {unknown}")
    given = {p.name for p in profiles}
    missing = [name for name, dims in inputs.items() if -1 in dims and name not in given]
    if missing:
        pretty = ", ".join(f"{n}{inputs[n]}" for n in missing)
        raise UsageError(f"dynamic input(s) {pretty} need --profile NAME:MIN,OPT,MAX for TensorRT")


def plan_build(onnx_path: str | Path, config: BuildConfig, caps: TrtCaps) -> BuildPlan:
    """The Polygraphy network and config loaders for ``config`` on a TensorRT with ``caps``.

    Needs Polygraphy, not TensorRT (nothing is called). UsageError for dynamic inputs without a
    profile or profiles naming unknown inputs.
    """
    import onnx

    poly = import_polygraphy_trt()
    onnx_path = Path(onnx_path)
    dtypes, inputs = _onnx_facts(onnx_path)
    profiles = config.shape_profiles()
    _check_profiles(inputs, profiles)
    tp = onnx.TensorProto
    if config.strongly_typed is not None:
        if config.strongly_typed and not caps.strongly_typed_flag and caps.major < 11:
            raise BackendUnavailableError(
                f"TensorRT {caps.version} has no strongly typed networks (needs TensorRT 10+)")
        strongly_typed = config.strongly_typed
    else:
        strongly_typed = caps.major >= 11 or (caps.strongly_typed_flag and tp.FLOAT16 in dtypes)
    notes = []
    sparse_capable = {tp.FLOAT16, tp.BFLOAT16, tp.INT8, getattr(tp, "FLOAT8E4M3FN", -1)}
    if config.sparse and strongly_typed and not (sparse_capable & dtypes):
        notes.append("strongly typed build of an ONNX file with only FP32 weights: TensorRT has "
                     "no FP32 sparse kernels, so no layer can run 2:4 — write FP16 (or Q/DQ INT8) weights")
    fp16_flag = bool(config.fp16 and not strongly_typed and caps.fp16_flag)
    if config.fp16 and not strongly_typed and not caps.fp16_flag:
        notes.append("this TensorRT has no FP16 builder flag; precision follows the ONNX dtypes")

    profile = None
    if profiles:
        profile = poly.Profile()
        for spec in profiles:
            profile.add(spec.name, spec.min, spec.opt, spec.max)
    cache = str(config.timing_cache) if config.timing_cache else None
    # TensorRT 11 has no STRONGLY_TYPED flag to set: every network is strongly typed there.
    network = poly.NetworkFromOnnxPath(str(onnx_path), strongly_typed=strongly_typed and caps.strongly_typed_flag)
    create = poly.CreateConfig(
        tf32=caps.tf32_flag, fp16=fp16_flag, sparse_weights=config.sparse,
        profiles=[profile] if profile is not None else None, load_timing_cache=cache,
        profiling_verbosity=None,  # Polygraphy's default: DETAILED, which the inspector needs
    )
    if config.workspace_bytes is not None:
        limit = int(config.workspace_bytes)

        def set_workspace(_builder: Any, _network: Any, trt_config: Any) -> None:
            import tensorrt as trt  # only called while building, with TensorRT there

            trt_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, limit)

        create = poly.PostprocessConfig(create, set_workspace)
    return BuildPlan(network, create, strongly_typed, fp16_flag, notes)
