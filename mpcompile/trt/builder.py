"""Build a TensorRT engine from ONNX with 2:4 sparse weights enabled, inspect it, time it.

Why our own builder instead of shelling out to ``trtexec``: the audit needs three things from
one build — the builder log's "(Sparsity) eligible / picked" lines, the inspector's per-layer
tactics (``ProfilingVerbosity.DETAILED``), and the engine — and the Python API gives all three
without parsing a subprocess's stdout. ``tensorrt`` is imported lazily inside the functions that
need it; without it they raise :class:`BackendUnavailableError` in one line and the rest of
mpcompile (analysis, rewrite, check, modeled speedup) keeps working.

Typing: TensorRT 11 builds every network strongly typed (the ONNX dtypes decide the precision
and ``BuilderFlag.FP16`` is gone); TensorRT 10 offers it as a network flag. ``strongly_typed=None``
resolves to True on TensorRT ≥ 11, and on TensorRT 10 when the ONNX file already stores FP16
weights; the FP16 builder flag is set only for weakly typed builds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as _dt
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mpcompile.errors import (
    BackendUnavailableError,
    MpcompileError,
    UnsupportedModelError,
    UsageError,
)
from mpcompile.trt.inspector import EngineInfo, parse_engine_info
from mpcompile.trt.log_parse import SparsityLog, parse_build_log
from mpcompile.trt.stats import LatencyStats, latency_stats

__all__ = [
    "BuildConfig",
    "BuildResult",
    "ShapeProfile",
    "build_engine",
    "cuda_devices",
    "gpu_available",
    "import_tensorrt",
    "parse_profile_spec",
    "tensorrt_major",
    "time_engine",
]

logger = logging.getLogger(__name__)

_MISSING_TRT = (
    "TensorRT is not installed (pip install 'mpcompile[gpu]'); the build & audit stage needs "
    "TensorRT and an NVIDIA GPU (sm80+) — without them use the modeled speedup"
)
_SEVERITY_LETTER = {"INTERNAL_ERROR": "F", "ERROR": "E", "WARNING": "W", "INFO": "I", "VERBOSE": "V"}


def import_tensorrt() -> Any:
    """``import tensorrt`` or a one-line BackendUnavailableError (missing package or libraries)."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:
        detail = "" if isinstance(exc, ModuleNotFoundError) else f" (import failed: {exc})"
        raise BackendUnavailableError(_MISSING_TRT + detail) from None
    return trt


def tensorrt_major(trt: Any) -> int:
    match = re.match(r"(\d+)", str(getattr(trt, "__version__", "0")))
    return int(match.group(1)) if match else 0


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
        raise UsageError(f"--shape '{spec}': '{text}' is not a shape like 1x3x224x224")
    return tuple(int(p) for p in parts)


def parse_profile_spec(spec: str) -> ShapeProfile:
    """``name:min,opt,max`` (shapes written ``8x128``) or ``name:shape`` → ShapeProfile.

    A spec with no ``x`` at all is one static shape with comma-separated dims, as
    ``mpcompile --shape input:1,3,224,224`` accepts; so rank-1 profiles are written ``4x,8x,16x``.
    """
    name, sep, rest = spec.strip().rpartition(":")
    if not sep or not name or not rest:
        raise UsageError(f"--shape '{spec}': expected NAME:MIN,OPT,MAX (e.g. input:1x128,8x128,32x128)")
    if "x" not in rest:
        shape = _dims(rest, spec)
        return ShapeProfile(name, shape, shape, shape)
    parts = [p for p in rest.split(",")]
    if len(parts) == 1:
        shape = _dims(parts[0], spec)
        return ShapeProfile(name, shape, shape, shape)
    if len(parts) != 3:
        raise UsageError(f"--shape '{spec}': give one shape or three (min,opt,max), got {len(parts)}")
    lo, opt, hi = (_dims(p, spec) for p in parts)
    if not len(lo) == len(opt) == len(hi):
        raise UsageError(f"--shape '{spec}': min, opt and max must have the same rank")
    if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
        raise UsageError(f"--shape '{spec}': need min <= opt <= max in every dimension")
    return ShapeProfile(name, lo, opt, hi)


@dataclass
class BuildConfig:
    """How to build one engine.

    Attributes:
        sparse: set ``BuilderFlag.SPARSE_WEIGHTS`` (the ``trtexec --sparsity=enable`` switch).
        fp16: allow FP16 kernels in a weakly typed build (ignored when strongly typed).
        strongly_typed: None = automatic (see the module docstring).
        profiles: dynamic-input shapes, e.g. ``[parse_profile_spec("input:1x128,8x128,32x128")]``
            or the strings themselves.
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


# ----------------------------------------------------------------------------- logging


class _LogSink:
    """Collects TensorRT log records: to a file, to memory (for parsing), WARNING+ to logging."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []
        self._file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, letter: str, message: str) -> None:
        stamp = _dt.datetime.now().strftime("%m/%d/%Y-%H:%M:%S")
        record = f"[{stamp}] [{letter}] [TRT] {message}"
        self.lines.append(record)
        self._file.write(record + "\n")
        if letter in ("F", "E"):
            logger.error("TensorRT: %s", message)
        elif letter == "W":
            logger.warning("TensorRT: %s", message)
        else:
            logger.debug("TensorRT: %s", message)

    def text(self) -> str:
        return "\n".join(self.lines)

    def close(self) -> None:
        self._file.close()


def _make_logger(trt: Any, sink: _LogSink, verbose: bool) -> Any:
    """A ``trt.ILogger`` subclass (defined here because ``trt`` is only imported lazily)."""
    letters = {}
    for name, letter in _SEVERITY_LETTER.items():
        severity = getattr(trt.ILogger.Severity, name, None) if hasattr(trt.ILogger, "Severity") else None
        if severity is None:
            severity = getattr(trt.Logger, name, None)
        if severity is not None:
            letters[severity] = letter
    verbose_severity = getattr(trt.Logger, "VERBOSE", None)

    class _CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:  # noexcept in C++: never raise
            try:
                if severity == verbose_severity and not verbose:
                    return
                sink.write(letters.get(severity, "I"), str(msg))
            except Exception:  # a logger that raises would abort the build
                logger.debug("could not record a TensorRT log message", exc_info=True)

    return _CapturingLogger()


# ----------------------------------------------------------------------------- build


def _weight_dtypes(onnx_path: Path) -> set[int]:
    """ONNX element types of the stored initializers (external data is not loaded)."""
    import onnx  # core dependency

    model = onnx.load(str(onnx_path), load_external_data=False)
    return {init.data_type for init in model.graph.initializer}


def _has_fp16_weights(onnx_path: Path) -> bool:
    import onnx

    return onnx.TensorProto.FLOAT16 in _weight_dtypes(onnx_path)


def _has_sparse_capable_weights(onnx_path: Path) -> bool:
    """FP16 / BF16 / INT8 / FP8 initializers: the dtypes TensorRT's 2:4 kernels take."""
    import onnx

    tp = onnx.TensorProto
    wanted = {tp.FLOAT16, tp.BFLOAT16, tp.INT8, getattr(tp, "FLOAT8E4M3FN", -1)}
    return bool(wanted & _weight_dtypes(onnx_path))


def _resolve_strongly_typed(trt: Any, config: BuildConfig, onnx_path: Path) -> bool:
    flag_exists = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    major = tensorrt_major(trt)
    if config.strongly_typed is not None:
        if config.strongly_typed and not flag_exists and major < 11:
            raise BackendUnavailableError(
                f"TensorRT {trt.__version__} has no strongly typed networks (needs TensorRT 10+)")
        return config.strongly_typed
    if major >= 11:
        return True
    return flag_exists and _has_fp16_weights(onnx_path)


def _parser_errors(parser: Any) -> str:
    messages = []
    for index in range(int(getattr(parser, "num_errors", 0))):
        messages.append(" ".join(str(parser.get_error(index)).split()))
    return "; ".join(messages) or "no error detail from the parser"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _dynamic_inputs(network: Any) -> dict[str, tuple[int, ...]]:
    out = {}
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape):
            out[tensor.name] = shape
    return out


def _add_profiles(builder: Any, network: Any, bconfig: Any, profiles: list[ShapeProfile]) -> None:
    dynamic = _dynamic_inputs(network)
    given = {p.name: p for p in profiles}
    unknown = set(given) - {network.get_input(i).name for i in range(network.num_inputs)}
    if unknown:
        raise UsageError(f"--shape names unknown input(s) {sorted(unknown)}")
    missing = [name for name in dynamic if name not in given]
    if missing:
        pretty = ", ".join(f"{n}{list(dynamic[n])}" for n in missing)
        raise UsageError(f"dynamic input(s) {pretty} need --shape NAME:MIN,OPT,MAX for TensorRT")
    if not profiles:
        return
    profile = builder.create_optimization_profile()
    for spec in profiles:
        profile.set_shape(spec.name, spec.min, spec.opt, spec.max)
    bconfig.add_optimization_profile(profile)


def build_engine(
    onnx_path: str | Path,
    config: BuildConfig,
    engine_path: str | Path,
    log_path: str | Path | None = None,
) -> BuildResult:
    """Parse ``onnx_path`` with ``trt.OnnxParser``, build, write the engine and its layer info.

    Writes ``engine_path``, the builder log (``log_path``, default ``<engine>.log``) and the
    inspector JSON (``<engine>.layers.json``). Raises BackendUnavailableError without TensorRT,
    UnsupportedModelError when the parser rejects the model, MpcompileError when the build fails
    (with the last TensorRT error lines).
    """
    trt = import_tensorrt()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UsageError(f"ONNX file {onnx_path} does not exist")
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_path) if log_path is not None else engine_path.with_suffix(engine_path.suffix + ".log")
    layer_info_path = engine_path.with_suffix(".layers.json")
    profiles = config.shape_profiles()

    sink = _LogSink(log_path)
    try:
        trt_logger = _make_logger(trt, sink, config.verbose_log)
        sink.write("I", f"TensorRT version: {trt.__version__}")
        strongly_typed = _resolve_strongly_typed(trt, config, onnx_path)
        notes = []
        if config.sparse and strongly_typed and not _has_sparse_capable_weights(onnx_path):
            notes.append("strongly typed build of an ONNX file with only FP32 weights: TensorRT has "
                         "no FP32 sparse kernels, so no layer can run 2:4 — write FP16 (or Q/DQ INT8) weights")
            logger.warning(notes[-1])
        builder = trt.Builder(trt_logger)
        flags = 0
        if tensorrt_major(trt) < 10 and hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, trt_logger)
        # parse_from_file resolves external data relative to the model's folder.
        if not parser.parse_from_file(str(onnx_path)):
            raise UnsupportedModelError(
                f"TensorRT's ONNX parser rejected {onnx_path.name}: {_parser_errors(parser)}")

        bconfig = builder.create_builder_config()
        bconfig.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        if config.sparse:
            bconfig.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
        fp16_flag = False
        if config.fp16 and not strongly_typed:
            if hasattr(trt.BuilderFlag, "FP16"):
                bconfig.set_flag(trt.BuilderFlag.FP16)
                fp16_flag = True
            else:
                logger.warning("this TensorRT has no FP16 builder flag; precision follows the ONNX dtypes")
        if config.workspace_bytes is not None:
            bconfig.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_bytes))
        cache_path = Path(config.timing_cache) if config.timing_cache else None
        if cache_path is not None:
            data = cache_path.read_bytes() if cache_path.is_file() else b""
            cache = bconfig.create_timing_cache(data)
            bconfig.set_timing_cache(cache, ignore_mismatch=False)
        _add_profiles(builder, network, bconfig, profiles)

        start = time.perf_counter()
        serialized = builder.build_serialized_network(network, bconfig)
        seconds = time.perf_counter() - start
        if serialized is None:
            errors = [line for line in sink.lines if "] [E] " in line or "] [F] " in line][-3:]
            raise MpcompileError("TensorRT build failed: " + (" | ".join(errors) or "see " + str(log_path)))
        blob = bytes(serialized)
        _atomic_write(engine_path, blob)
        if cache_path is not None:
            _atomic_write(cache_path, bytes(bconfig.get_timing_cache().serialize()))

        runtime = trt.Runtime(trt_logger)
        engine = runtime.deserialize_cuda_engine(blob)
        if engine is None:
            raise MpcompileError(f"TensorRT could not load the engine it just built; see {log_path}")
        inspector = engine.create_engine_inspector()
        info_text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
        layer_info_path.write_text(info_text, encoding="utf-8")
        log_text = sink.text()
    finally:
        sink.close()

    log_info = parse_build_log(log_text)
    if log_info.tensorrt_version is None:
        log_info.tensorrt_version = str(trt.__version__)
    result = BuildResult(
        engine_path=engine_path, log_path=log_path, layer_info_path=layer_info_path,
        tensorrt_version=str(trt.__version__), strongly_typed=strongly_typed, fp16_flag=fp16_flag,
        sparse_flag=config.sparse, build_seconds=seconds, engine_bytes=len(blob),
        engine=parse_engine_info(info_text), log=log_info, notes=notes,
    )
    logger.info("built %s in %.1f s: %d layers, %d eligible, %d picked sparse", engine_path,
                seconds, len(result.engine.layers), len(log_info.eligible_layers),
                len(log_info.picked_sparse_layers))
    return result


# ----------------------------------------------------------------------------- timing


def _torch_cuda() -> Any | None:
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _cudart() -> Any | None:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            return None
    return cudart


def _io_names(trt: Any, engine: Any) -> tuple[list[str], list[str]]:
    if not hasattr(engine, "num_io_tensors"):
        raise BackendUnavailableError(f"TensorRT {trt.__version__} lacks the named-tensor API (needs 8.5+)")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    return inputs, outputs


def _time_loop(run: Callable[[], None], record: Callable[[], float], warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        run()
    return [record() for _ in range(iters)]


def time_engine(
    engine_path: str | Path,
    inputs: Mapping[str, np.ndarray],
    warmup: int = 20,
    iters: int = 200,
) -> LatencyStats:
    """Median / p10 / p90 latency of one ``execute_async_v3`` call, timed with CUDA events.

    Buffers live on the GPU through torch (CUDA build) or cuda-python, whichever is installed;
    inputs are copied once before timing, so the figure is pure engine time.
    """
    if warmup < 0 or iters < 1:
        raise UsageError("time_engine needs warmup >= 0 and iters >= 1")
    trt = import_tensorrt()
    torch = _torch_cuda()
    cudart = None if torch is not None else _cudart()
    if torch is None and cudart is None:
        raise BackendUnavailableError(
            "timing a TensorRT engine needs CUDA buffers: install a CUDA build of torch or "
            "cuda-python (pip install cuda-python)")
    trt_logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(trt_logger)
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise MpcompileError(f"TensorRT could not load {engine_path} (built for another GPU or version?)")
    context = engine.create_execution_context()
    input_names, output_names = _io_names(trt, engine)
    missing = [n for n in input_names if n not in inputs]
    if missing:
        raise UsageError(f"engine inputs {missing} were not given (have {sorted(inputs)})")
    arrays = {}
    for name in input_names:
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
        arrays[name] = np.ascontiguousarray(np.asarray(inputs[name]).astype(dtype, copy=False))
        if not context.set_input_shape(name, tuple(arrays[name].shape)):
            raise UsageError(f"input '{name}' shape {arrays[name].shape} is outside the engine's profile")
    out_specs = {}
    for name in output_names:
        shape = tuple(context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise UnsupportedModelError(f"output '{name}' has a data-dependent shape {shape}; cannot preallocate")
        out_specs[name] = (shape, np.dtype(trt.nptype(engine.get_tensor_dtype(name))))
    if torch is not None:
        samples = _time_with_torch(torch, context, arrays, out_specs, warmup, iters)
    else:
        samples = _time_with_cudart(cudart, context, arrays, out_specs, warmup, iters)
    return latency_stats(samples)


def _time_with_torch(torch: Any, context: Any, arrays: dict, out_specs: dict, warmup: int, iters: int) -> list[float]:
    device = torch.device("cuda")
    keep = {}
    for name, array in arrays.items():
        keep[name] = torch.from_numpy(array).to(device)
    for name, (shape, dtype) in out_specs.items():
        keep[name] = torch.empty(shape, dtype=torch.from_numpy(np.zeros(0, dtype)).dtype, device=device)
    for name, tensor in keep.items():
        context.set_tensor_address(name, tensor.data_ptr())
    stream = torch.cuda.Stream()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def run() -> None:
        if not context.execute_async_v3(stream.cuda_stream):
            raise MpcompileError("TensorRT execute_async_v3 failed")

    def record() -> float:
        start.record(stream)
        run()
        end.record(stream)
        end.synchronize()
        return float(start.elapsed_time(end))

    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        samples = _time_loop(run, record, warmup, iters)
    return samples


def _cuda_check(result: Any) -> Any:
    err = result[0] if isinstance(result, tuple) else result
    if int(err) != 0:
        raise MpcompileError(f"CUDA runtime error {err}")
    if isinstance(result, tuple):
        return result[1] if len(result) == 2 else result[1:]
    return None


def _time_with_cudart(cudart: Any, context: Any, arrays: dict, out_specs: dict, warmup: int, iters: int) -> list[float]:
    pointers = []
    try:
        for name, array in arrays.items():
            ptr = _cuda_check(cudart.cudaMalloc(max(array.nbytes, 1)))
            pointers.append(ptr)
            _cuda_check(cudart.cudaMemcpy(ptr, array.ctypes.data, array.nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
            context.set_tensor_address(name, int(ptr))
        for name, (shape, dtype) in out_specs.items():
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            ptr = _cuda_check(cudart.cudaMalloc(max(nbytes, 1)))
            pointers.append(ptr)
            context.set_tensor_address(name, int(ptr))
        stream = _cuda_check(cudart.cudaStreamCreate())
        start = _cuda_check(cudart.cudaEventCreate())
        end = _cuda_check(cudart.cudaEventCreate())
        handle = int(stream)

        def run() -> None:
            if not context.execute_async_v3(handle):
                raise MpcompileError("TensorRT execute_async_v3 failed")

        def record() -> float:
            _cuda_check(cudart.cudaEventRecord(start, stream))
            run()
            _cuda_check(cudart.cudaEventRecord(end, stream))
            _cuda_check(cudart.cudaEventSynchronize(end))
            return float(_cuda_check(cudart.cudaEventElapsedTime(start, end)))

        samples = _time_loop(run, record, warmup, iters)
        _cuda_check(cudart.cudaEventDestroy(start))
        _cuda_check(cudart.cudaEventDestroy(end))
        _cuda_check(cudart.cudaStreamDestroy(stream))
        return samples
    finally:
        for ptr in pointers:
            cudart.cudaFree(ptr)


# ----------------------------------------------------------------------------- availability


def _libcuda() -> ctypes.CDLL | None:
    names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so"]
    found = ctypes.util.find_library("cuda")
    if found:
        names.append(found)
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def cuda_devices() -> list[tuple[str, tuple[int, int]]]:
    """(name, compute capability) of every visible GPU, via the driver API; [] when none."""
    lib = _libcuda()
    if lib is None:
        return []
    if lib.cuInit(0) != 0:
        return []
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return []
    devices = []
    for index in range(count.value):
        device = ctypes.c_int(0)
        if lib.cuDeviceGet(ctypes.byref(device), index) != 0:
            continue
        buffer = ctypes.create_string_buffer(256)
        lib.cuDeviceGetName(buffer, 256, device)
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        lib.cuDeviceGetAttribute(ctypes.byref(major), 75, device)  # COMPUTE_CAPABILITY_MAJOR
        lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)  # COMPUTE_CAPABILITY_MINOR
        devices.append((buffer.value.decode(errors="replace"), (major.value, minor.value)))
    return devices


def gpu_available(require_tensorrt: bool = True) -> tuple[bool, str]:
    """Can the measured TensorRT sparse audit run here? ``(ok, reason)``; never raises.

    Checks, in order: TensorRT importable (when required), an NVIDIA driver and GPU visible,
    and sparse tensor cores (sm80+) on GPU 0.
    """
    try:
        version = None
        if require_tensorrt:
            try:
                version = import_tensorrt().__version__
            except BackendUnavailableError as exc:
                return False, str(exc)
        devices = cuda_devices()
        if not devices:
            return False, "no NVIDIA GPU visible (no CUDA driver, or CUDA_VISIBLE_DEVICES hides it)"
        name, (major, minor) = devices[0]
        where = f"{name} (sm{major}{minor})"
        if (major, minor) < (8, 0):
            return False, f"{where} has no sparse tensor cores: 2:4 needs Ampere (sm80) or newer"
        return True, where + (f", TensorRT {version}" if version else "")
    except Exception as exc:  # noqa: BLE001 - documented never to raise
        return False, f"GPU probe failed: {type(exc).__name__}: {exc}"
