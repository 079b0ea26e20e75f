"""Build a TensorRT engine from ONNX with 2:4 sparse weights enabled, through Polygraphy.

Why Polygraphy (DESIGN §5): its TensorRT backend already does, across TensorRT versions, what
an engine build needs — the network from ONNX (``NetworkFromOnnxPath``, external data included),
the builder config (``CreateConfig(sparse_weights=..., fp16=..., profiles=...,
load_timing_cache=...)``, ``ProfilingVerbosity.DETAILED`` by default) and the build with its
timing cache (``EngineBytesFromNetwork``). What stays ours: keeping the builder log (TensorRT's
records arrive through Polygraphy's logger) for its "(Sparsity) eligible / picked" lines, the
engine inspector's JSON for the per-layer table (:mod:`mpcompile.trt.inspector`), atomic writes,
and one-line errors instead of Polygraphy's exceptions.

``tensorrt`` and ``polygraphy`` are imported lazily; without TensorRT the functions raise
:class:`BackendUnavailableError` (exit 6), without Polygraphy :class:`OptionalDependencyError`
(exit 5), each in one line, and the rest of mpcompile keeps working. The loaders are made by
:mod:`mpcompile.trt.build_plan` (tested without TensorRT); timing is :mod:`mpcompile.trt.timing`
and the GPU probe :mod:`mpcompile.trt.gpu_probe` (re-exported here).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpcompile.errors import (
    BackendUnavailableError,
    MpcompileError,
    UnsupportedModelError,
    UsageError,
)
from mpcompile.trt.build_plan import (
    BuildConfig,
    BuildPlan,
    ShapeProfile,
    TrtCaps,
    import_polygraphy_trt,
    parse_profile_spec,
    plan_build,
)
from mpcompile.trt.gpu_probe import cuda_devices, gpu_available
from mpcompile.trt.inspector import EngineInfo, parse_engine_info
from mpcompile.trt.log_parse import SparsityLog, parse_build_log
from mpcompile.trt.timing import time_engine

__all__ = [
    "BuildConfig",
    "BuildPlan",
    "BuildResult",
    "ShapeProfile",
    "TrtCaps",
    "build_engine",
    "capture_polygraphy_log",
    "cuda_devices",
    "gpu_available",
    "import_polygraphy_trt",
    "import_tensorrt",
    "parse_profile_spec",
    "plan_build",
    "time_engine",
]

logger = logging.getLogger(__name__)

_MISSING_TRT = (
    "TensorRT is not installed (pip install 'mpcompile[gpu]'); the build & audit stage needs "
    "TensorRT and an NVIDIA GPU (sm80+) — without them use the modeled speedup"
)


def import_tensorrt() -> Any:
    """``import tensorrt`` or a one-line BackendUnavailableError (missing package or libraries)."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:
        detail = "" if isinstance(exc, ModuleNotFoundError) else f" (import failed: {exc})"
        raise BackendUnavailableError(_MISSING_TRT + detail) from None
    return trt


# ----------------------------------------------------------------------------- logging


class _Collect(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(level=1)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.lines.append(message)
        if record.levelno >= logging.ERROR:
            logger.error("TensorRT: %s", message)
        elif record.levelno >= logging.WARNING:
            logger.warning("TensorRT: %s", message)


@contextmanager
def capture_polygraphy_log(verbose: bool = False) -> Iterator[list[str]]:
    """Route Polygraphy's logger (which carries TensorRT's) into a list instead of stdout.

    Polygraphy logs TensorRT INFO records, where the sparsity lines are, at its VERBOSE level,
    so that is the floor here (``verbose`` adds TensorRT VERBOSE). Restores the logger after.
    """
    from polygraphy.logger import G_LOGGER

    lines: list[str] = []
    py_logger = logging.getLogger("Polygraphy")
    handler = _Collect(lines)
    saved = (G_LOGGER.module_severity, G_LOGGER.use_python_logging_system, G_LOGGER.colors,
             py_logger.propagate, py_logger.level)
    G_LOGGER.module_severity = G_LOGGER.EXTRA_VERBOSE if verbose else G_LOGGER.VERBOSE
    G_LOGGER.colors = False
    G_LOGGER.use_python_logging_system = True
    py_logger.addHandler(handler)
    py_logger.propagate = False
    py_logger.setLevel(1)
    try:
        yield lines
    finally:
        py_logger.removeHandler(handler)
        (G_LOGGER.module_severity, G_LOGGER.use_python_logging_system, G_LOGGER.colors,
         py_logger.propagate) = saved[:4]
        py_logger.setLevel(saved[4])


def _error_lines(lines: list[str], last: int = 3) -> str:
    errors = [" ".join(line.split()) for line in lines if line.lstrip().startswith(("[E]", "[!]"))]
    return "; ".join(errors[-last:])


def _atomic_write(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- build


@dataclass
class BuildResult:
    """A built engine and what TensorRT said about sparsity while building it."""

    engine_path: Path
    log_path: Path
    layer_info_path: Path
    tensorrt_version: str
    strongly_typed: bool
    fp16_flag: bool
    sparse_flag: bool
    build_seconds: float
    engine_bytes: int
    engine: EngineInfo
    log: SparsityLog
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "engine_path": str(self.engine_path), "log_path": str(self.log_path),
            "layer_info_path": str(self.layer_info_path), "tensorrt_version": self.tensorrt_version,
            "strongly_typed": self.strongly_typed, "fp16_flag": self.fp16_flag,
            "sparse_flag": self.sparse_flag, "build_seconds": self.build_seconds,
            "engine_bytes": self.engine_bytes, "notes": list(self.notes), "log": self.log.to_dict(),
            "engine": self.engine.to_dict(),
        }


def build_engine(
    onnx_path: str | Path,
    config: BuildConfig,
    engine_path: str | Path,
    log_path: str | Path | None = None,
) -> BuildResult:
    """Build ``onnx_path`` with Polygraphy's loaders; write the engine, its log and layer info.

    Writes ``engine_path``, the builder log (``log_path``, default ``<engine>.log``) and the
    inspector JSON (``<engine>.layers.json``). Raises BackendUnavailableError without TensorRT,
    OptionalDependencyError without Polygraphy, UnsupportedModelError when the parser rejects the
    model, MpcompileError when the build fails (with the last TensorRT error lines).
    """
    trt = import_tensorrt()
    poly = import_polygraphy_trt()
    from polygraphy.exception import PolygraphyException

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UsageError(f"ONNX file {onnx_path} does not exist")
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_path) if log_path is not None else engine_path.with_suffix(engine_path.suffix + ".log")
    layer_info_path = engine_path.with_suffix(".layers.json")

    with capture_polygraphy_log(config.verbose_log) as lines:
        lines.append(f"[I] TensorRT version: {trt.__version__}")
        try:
            plan = plan_build(onnx_path, config, TrtCaps.of(trt))
            for note in plan.notes:
                logger.warning(note)
            try:
                network = plan.network()
            except PolygraphyException:
                raise UnsupportedModelError(f"TensorRT's ONNX parser rejected {onnx_path.name}: "
                                            + (_error_lines(lines, 5) or "no error detail")) from None
            start = time.perf_counter()
            try:
                cache = str(config.timing_cache) if config.timing_cache else None
                build = poly.EngineBytesFromNetwork(network, plan.config, save_timing_cache=cache)
                blob = bytes(build())
            except PolygraphyException:
                raise MpcompileError("TensorRT build failed: " + (_error_lines(lines) or f"see {log_path}")) from None
            seconds = time.perf_counter() - start
            _atomic_write(engine_path, blob)
            try:
                engine = poly.EngineFromBytes(blob)()
            except PolygraphyException:
                raise MpcompileError(f"TensorRT could not load the engine it just built; see {log_path}") from None
            info_text = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
        finally:
            _atomic_write(log_path, "\n".join(lines) + "\n")
    _atomic_write(layer_info_path, info_text)

    log_info = parse_build_log("\n".join(lines))
    if log_info.tensorrt_version is None:
        log_info.tensorrt_version = str(trt.__version__)
    result = BuildResult(
        engine_path=engine_path, log_path=log_path, layer_info_path=layer_info_path,
        tensorrt_version=str(trt.__version__), strongly_typed=plan.strongly_typed,
        fp16_flag=plan.fp16_flag, sparse_flag=config.sparse, build_seconds=seconds,
        engine_bytes=len(blob), engine=parse_engine_info(info_text), log=log_info, notes=plan.notes,
    )
    logger.info("built %s in %.1f s: %d layers, %d eligible, %d picked sparse", engine_path,
                seconds, len(result.engine.layers), len(log_info.eligible_layers),
                len(log_info.picked_sparse_layers))
    return result
