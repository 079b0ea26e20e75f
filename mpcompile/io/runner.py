"""The ONNX Runtime side of calibration and validation: one session over a model whose large
weights are fed as inputs, and the loops that run it over calibration samples.

Why its own module: every stage that runs the model (reference outputs, capture, validation,
drift measurement, revert) goes through these few functions, and they know nothing about
where the samples came from (``calibration.py``) or what is done with the outputs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

if TYPE_CHECKING:
    from mpcompile.io.calibration import CalibrationData

__all__ = ["FED_WEIGHT_MIN_BYTES", "ModelRunner", "release_freed_memory", "run_model", "run_slice",
           "runtime_error_line"]

logger = logging.getLogger(__name__)

FED_WEIGHT_MIN_BYTES = 4096  # smaller initializers stay constants of the session graph
_FED_DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE})


def _load_libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()

class ModelRunner:
    """An ONNX Runtime CPU session over ``model`` whose large float weights are fed as inputs.

    Why fed and not baked in: a session copies (and pre-packs) every initializer when it is
    created, a second copy of the model beside ours, which set the peak memory of a compile;
    serialising the model for it cost a third. Fed from our tensors at each run, the session
    holds no weights, starts in milliseconds and runs as fast (measured on ViT-B/16 and
    ResNet-50 shapes). It reads each weight's current tensor at every run, so rewrites of
    existing initializers between runs are seen.
    """

    def __init__(self, model: ir.Model, extra_outputs: list[ir.Value] = ()) -> None:
        graph = model.graph
        self._fed = [v for v in graph.initializers.values() if _is_fed(v)]
        added = [v for v in dict.fromkeys(extra_outputs) if v not in graph.outputs]
        order = list(graph.initializers.values())
        moved = [v for v in self._fed if v not in graph.inputs]
        tensors = {v.name: v.const_value for v in self._fed}
        # A small initializer kept in the graph but stored as external data would reach the
        # session as a path relative to the *working directory* (the payload has no folder),
        # which ONNX Runtime refuses: it goes in inline, only for the serialisation.
        inlined = {v: v.const_value for v in graph.initializers.values()
                   if v not in self._fed and isinstance(v.const_value, ir.ExternalTensor)}
        graph.outputs.extend(added)
        try:
            for value, tensor in inlined.items():
                value.const_value = ir.Tensor(np.array(tensor.numpy()), dtype=tensor.dtype, name=tensor.name)
                tensor.release()
            for value in self._fed:
                graph.initializers.pop(value.name)
                value.const_value = None
            graph.inputs.extend(moved)
            payload = ir.to_proto(model).SerializeToString()
        finally:
            for value, tensor in inlined.items():
                value.const_value = tensor
            for value in moved:
                graph.inputs.remove(value)
            for value in self._fed:
                value.const_value = tensors[value.name]
            graph.initializers.clear()
            for value in order:
                graph.register_initializer(value)
            for value in added:
                graph.outputs.remove(value)
        self.session = ort.InferenceSession(payload, _session_options(), providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, batch: dict[str, np.ndarray], names: list[str] | None = None) -> list[np.ndarray]:
        feeds = dict(batch)
        for value in self._fed:
            feeds[value.name] = value.const_value.numpy()
        return self.session.run(names or self.output_names, feeds)


def _is_fed(value: ir.Value) -> bool:
    """Large float initializers of the main graph; small ones (shapes, scalars) stay constants."""
    tensor = value.const_value
    return (tensor is not None and tensor.dtype in _FED_DTYPES and tensor.nbytes >= FED_WEIGHT_MIN_BYTES
            and value not in value.graph.outputs)


def _session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures raise; their native log line would only repeat them
    # No arena: the arena keeps the high-water mark of every exposed intermediate for the
    # session's lifetime, which dominated peak memory on big calibration captures.
    options.enable_cpu_mem_arena = False
    # Basic optimizations only: extended fusions could fold away the tensors we expose.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return options


def release_freed_memory() -> None:
    """Hand memory freed by a finished ONNX Runtime session back to the OS (glibc only).

    Why: glibc keeps freed heap pages for reuse; after a session over a big model that is
    hundreds of MB the process holds but no longer uses, on top of everything later stages need.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def runtime_error_line(exc: BaseException) -> str | None:
    """The first line of an ONNX Runtime error; None when ``exc`` is not one (its pybind
    errors share no public base class, only their module)."""
    if not (type(exc).__module__ or "").startswith("onnxruntime"):
        return None
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run_slice(runner: ModelRunner, data: CalibrationData, start: int, stop: int,
              names: list[str] | None = None) -> list[np.ndarray] | None:
    """``runner`` over samples ``start:stop``; None when the model runs only one sample at a time.

    Why: some exports declare a dynamic batch yet hard-code 1 in a Reshape (torch's dynamo
    export of ViT-B/16 writes ``[197, 768]`` for a ``[197, batch, 768]`` tensor). When a batch
    of several samples fails in ONNX Runtime and one sample runs, the data is switched to
    batch 1 for the rest of the compile (``data.batch_fallback`` says so) and the caller
    re-runs the slice one sample at a time. Any other failure is raised unchanged.
    """
    try:
        return runner.run(data.slice(start, stop), names)
    except Exception as exc:
        first = runtime_error_line(exc)
        if stop - start <= 1 or data.static_batch or first is None:
            raise
        try:
            runner.run(data.slice(start, start + 1), names)
        except Exception:
            raise exc from None
        data.static_batch = 1
        data.batch_fallback = (
            "the model declares a dynamic batch but ONNX Runtime runs it only at batch 1 (on "
            f"{stop - start} samples: {first[:160]}); calibration and validation ran one sample at a time")
        logger.warning(data.batch_fallback)
        return None


def run_model(model: ir.Model, data: CalibrationData, batch_size: int = 64) -> list[np.ndarray]:
    """Graph outputs of ``model`` over all calibration samples, concatenated per output."""
    runner = ModelRunner(model)
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in runner.output_names}
    total, start = data.require_covered(), 0
    while start < total:
        stop = min(start + (data.static_batch or batch_size), total)
        outputs = run_slice(runner, data, start, stop)
        if outputs is None:
            continue  # switched to one sample at a time: the same slice again
        for name, out in zip(runner.output_names, outputs):
            chunks[name].append(out)
        start = stop
    del runner
    release_freed_memory()
    return [np.concatenate(parts) for parts in chunks.values()]
