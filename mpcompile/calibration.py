"""Calibration: model inputs (user data or stated synthetic), ONNX Runtime sessions, and
per-layer input statistics captured by exposing intermediate tensors.

Why statistics and not activations: CAST, Wanda and SparseGPT need only the second moment
``XᵀX/rows`` of each layer's input (in TensorRT's reduction order), which is ``K²`` memory
whatever the calibration size. Layers are processed in chunks whose Gram matrices fit a
memory budget, each chunk costing one pass of ONNX Runtime over the calibration batches.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from mpcompile.errors import UsageError
from mpcompile.numerics.im2col import im2col_rows
from mpcompile.numerics.masks import LayerStats
from mpcompile.passes.gemm_discovery import GemmLayer
from mpcompile.shapes import ShapeSpec

__all__ = [
    "CalibrationData",
    "load_calibration",
    "synthetic_inputs",
    "make_session",
    "run_model",
    "capture_layer_stats",
    "MAX_ROWS_PER_BATCH",
]

logger = logging.getLogger(__name__)

MAX_ROWS_PER_BATCH = 4096
GRAM_BUDGET_BYTES = 256 * 2**20  # float32 K×K sums held at once while capturing
SESSION_VIA_FILE_BYTES = 64 * 2**20


def _load_libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()

_NP_DTYPES = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.FLOAT16: np.float16,
    ir.DataType.DOUBLE: np.float64,
    ir.DataType.INT64: np.int64,
    ir.DataType.INT32: np.int32,
    ir.DataType.BOOL: np.bool_,
}


@dataclass
class CalibrationData:
    """Model inputs by name, all with the same leading (sample) dimension.

    Attributes:
        source: "file:<path>" or a description of the synthetic data, for the report.
        labels: optional int labels (``labels`` array in the .npz) for accuracy.
    """

    inputs: dict[str, np.ndarray]
    source: str
    labels: np.ndarray | None = None
    static_batch: int | None = None  # the model's first dimension, when it is not dynamic

    @property
    def samples(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches in order; a model exported with a static batch gets exactly that size."""
        size = self.static_batch or batch_size
        stop = self.samples - self.samples % size if self.static_batch else self.samples
        if self.static_batch and stop == 0:
            raise UsageError(
                f"the model has a static batch of {size} but only {self.samples} samples were given"
            )
        for start in range(0, stop, size):
            yield {k: v[start : start + size] for k, v in self.inputs.items()}

    @property
    def used_labels(self) -> np.ndarray | None:
        """Labels of the samples that :meth:`batches` yields (a static batch drops the tail)."""
        if self.labels is None:
            return None
        if self.static_batch:
            return self.labels[: self.samples - self.samples % self.static_batch]
        return self.labels


def _graph_inputs(model: ir.Model) -> list[ir.Value]:
    return [v for v in model.graph.inputs if not v.is_initializer()]


def load_calibration(path: str | os.PathLike, model: ir.Model, *, limit: int | None = None) -> CalibrationData:
    """Read ``.npz`` (arrays named like the model inputs; optional ``labels``) or a folder of
    ``<input>.npy`` files, and match them to the model's inputs by name."""
    p = Path(path)
    arrays: dict[str, np.ndarray] = {}
    if p.is_dir():
        for f in sorted(p.glob("*.npy")):
            arrays[f.stem] = np.load(f, allow_pickle=False)
    elif p.is_file():
        try:
            with np.load(p, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (ValueError, OSError) as exc:
            raise UsageError(f"--calib {p}: not a readable .npz file ({exc})") from exc
    else:
        raise UsageError(f"--calib {p}: no such file or folder")
    labels = arrays.pop("labels", None)
    inputs: dict[str, np.ndarray] = {}
    for value in _graph_inputs(model):
        if value.name not in arrays:
            if len(_graph_inputs(model)) == 1 and len(arrays) == 1:
                arrays = {value.name: next(iter(arrays.values()))}
            else:
                raise UsageError(
                    f"--calib {p}: no array named '{value.name}' (has {sorted(arrays)}); "
                    "name arrays after the model inputs"
                )
        array = arrays[value.name]
        dtype = _NP_DTYPES.get(value.dtype, np.float32) if value.dtype is not None else np.float32
        rank = len(value.shape) if value.shape is not None else None
        if rank is not None and array.ndim != rank:
            raise UsageError(
                f"--calib {p}: '{value.name}' has rank {array.ndim}, the model input has rank {rank}"
            )
        inputs[value.name] = np.ascontiguousarray(array.astype(dtype, copy=False)[:limit])
    counts = {a.shape[0] for a in inputs.values()}
    if len(counts) != 1:
        raise UsageError(f"--calib {p}: inputs have different sample counts {sorted(counts)}")
    if labels is not None:
        labels = np.asarray(labels)[:limit]
    return CalibrationData(inputs=inputs, source=f"file:{p}", labels=labels, static_batch=static_batch(model))


def static_batch(model: ir.Model) -> int | None:
    """The first dimension shared by all model inputs when it is a fixed number, else None."""
    dims = set()
    for value in _graph_inputs(model):
        if value.shape is None or len(value.shape) == 0:
            return None
        first = value.shape[0]
        if not isinstance(first, int):
            return None
        dims.add(first)
    return dims.pop() if len(dims) == 1 else None


def _gather_table_rows(model: ir.Model, value: ir.Value) -> int | None:
    for use in value.uses():
        if use.node.op_type == "Gather" and use.idx == 1:
            table = use.node.inputs[0]
            if table is not None and table.const_value is not None:
                return int(table.const_value.shape[0])
    return None


def synthetic_inputs(model: ir.Model, spec: ShapeSpec, samples: int = 32, seed: int = 0) -> CalibrationData:
    """Data-free mode: N(0,1) floats; integer inputs as ids below the embedding size (or 0/1
    for names containing 'mask' / 'type'). Stated in every report as synthetic."""
    rng = np.random.default_rng(seed)
    inputs: dict[str, np.ndarray] = {}
    for value in _graph_inputs(model):
        if value.name in spec.inputs:
            shape = list(spec.inputs[value.name])
        else:
            shape = []
            for dim in value.shape or []:
                if isinstance(dim, int):
                    shape.append(dim)
                else:
                    shape.append(spec.dims.get(str(dim), spec.default))
        batch = static_batch(model)
        if batch:
            samples = max(batch, samples - samples % batch)
        shape[0:1] = [samples] if shape else []
        dtype = _NP_DTYPES.get(value.dtype, np.float32)
        if np.issubdtype(dtype, np.floating):
            arr = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            arr = np.ones(shape, dtype=dtype)
        else:
            lname = value.name.lower()
            if "mask" in lname:
                arr = np.ones(shape, dtype=dtype)
            elif "type" in lname:
                arr = np.zeros(shape, dtype=dtype)
            else:
                high = _gather_table_rows(model, value) or 100
                arr = rng.integers(0, high, size=shape).astype(dtype)
        inputs[value.name] = arr
    return CalibrationData(inputs=inputs, source=f"synthetic: {samples} samples, N(0,1) floats, seed {seed}",
                           static_batch=static_batch(model))


def make_session(model: ir.Model, extra_outputs: list[ir.Value] = ()) -> ort.InferenceSession:
    """An ONNX Runtime CPU session for ``model`` with extra intermediate tensors exposed.

    Big models go to ONNX Runtime through a temporary file with external data, written
    tensor by tensor: building a ModelProto and serialising it would hold two extra copies
    of every weight in memory while the session loads its own.
    """
    added = [v for v in dict.fromkeys(extra_outputs) if v not in model.graph.outputs]
    model.graph.outputs.extend(added)
    try:
        if _weight_bytes(model) > SESSION_VIA_FILE_BYTES:
            with tempfile.TemporaryDirectory(prefix="mpcompile-ort-") as folder:
                path = os.path.join(folder, "model.onnx")
                ir.save(model, path, external_data="model.onnx.data")
                return ort.InferenceSession(path, _session_options(), providers=["CPUExecutionProvider"])
        payload = ir.to_proto(model).SerializeToString()
    finally:
        for value in added:
            model.graph.outputs.remove(value)
    return ort.InferenceSession(payload, _session_options(), providers=["CPUExecutionProvider"])


def _weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
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


def run_model(model: ir.Model, data: CalibrationData, batch_size: int = 64) -> list[np.ndarray]:
    """Graph outputs of ``model`` over all calibration samples, concatenated per output."""
    session = make_session(model)
    names = [o.name for o in session.get_outputs()]
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for batch in data.batches(batch_size):
        for name, out in zip(names, session.run(names, batch)):
            chunks[name].append(out)
    del session
    release_freed_memory()
    return [np.concatenate(chunks[n]) for n in names]


def _conv_geometry(node: ir.Node, x_shape: tuple[int, ...], kernel: tuple[int, ...]) -> dict:
    strides = tuple(node.attributes.get_ints("strides", None) or (1,) * len(kernel))
    dilations = tuple(node.attributes.get_ints("dilations", None) or (1,) * len(kernel))
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    pads = tuple(node.attributes.get_ints("pads", None) or (0,) * (2 * len(kernel)))
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads_begin, pads_end = [], []
        for size, k, s, d in zip(x_shape[2:], kernel, strides, dilations):
            out = -(-size // s)
            total = max(0, (out - 1) * s + d * (k - 1) + 1 - size)
            small, big = total // 2, total - total // 2
            pads_begin.append(small if auto_pad == "SAME_UPPER" else big)
            pads_end.append(big if auto_pad == "SAME_UPPER" else small)
        pads = (*pads_begin, *pads_end)
    elif auto_pad == "VALID":
        pads = (0,) * (2 * len(kernel))
    return {"strides": strides, "pads": pads, "dilations": dilations}


def layer_rows(layer: GemmLayer, x: np.ndarray, rng: np.random.Generator, max_rows: int) -> np.ndarray:
    """The layer's input as ``[rows, K]`` in TensorRT order, at most ``max_rows`` random rows."""
    if layer.op_type == "Conv":
        if x.ndim != 4 or len(layer.kernel) != 2:
            raise UsageError(f"{layer.name}: only 2-D convolutions are supported for calibration")
        geometry = _conv_geometry(layer.node, x.shape, layer.kernel)
        top, left, bottom, right = geometry["pads"]
        rows = im2col_rows(
            x, layer.kernel, strides=geometry["strides"], pads=(top, left, bottom, right),
            dilations=geometry["dilations"],
        )
    else:
        if layer.op_type == "Gemm" and layer.node.attributes.get_int("transA", 0):
            x = x.T
        rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > max_rows:
        rows = rows[np.sort(rng.choice(rows.shape[0], size=max_rows, replace=False))]
    return np.asarray(rows, dtype=np.float32)


def capture_layer_stats(
    model: ir.Model,
    layers: list[GemmLayer],
    data: CalibrationData,
    *,
    batch_size: int = 8,
    max_rows: int = MAX_ROWS_PER_BATCH,
    seed: int = 0,
    gram_budget_bytes: int = GRAM_BUDGET_BYTES,
    progress: Callable[[str], None] | None = None,
) -> dict[str, LayerStats]:
    """``LayerStats`` (Gram of the input rows in TensorRT order) for each layer, by name.

    Layers reading the same tensor share the capture. At most ``max_rows`` random rows are
    taken from each batch (conv rows via im2col), bounding time on big feature maps.
    """
    rng = np.random.default_rng(seed)
    stats: dict[str, LayerStats] = {}
    chunk: list[GemmLayer] = []
    used = 0
    for layer in layers:
        size = 4 * layer.reduction**2
        if chunk and used + size > gram_budget_bytes:
            stats.update(_capture_chunk(model, chunk, data, batch_size, max_rows, rng, progress))
            chunk, used = [], 0
        chunk.append(layer)
        used += size
    if chunk:
        stats.update(_capture_chunk(model, chunk, data, batch_size, max_rows, rng, progress))
    return stats


def _capture_key(layer: GemmLayer) -> str:
    """Layers with the same key see identical input rows, so they share one Gram matrix."""
    if layer.op_type == "Conv" or (layer.op_type == "Gemm" and layer.node.attributes.get_int("transA", 0)):
        return f"layer:{layer.name}"
    return f"input:{layer.node.inputs[0].name}"


def _capture_chunk(model, chunk, data, batch_size, max_rows, rng, progress) -> dict[str, LayerStats]:
    inputs = [layer.node.inputs[0] for layer in chunk]
    session = make_session(model, inputs)
    names = list(dict.fromkeys(v.name for v in inputs))
    readers: dict[str, GemmLayer] = {}
    for layer in chunk:  # the first layer of each key extracts the rows for all of them
        readers.setdefault(_capture_key(layer), layer)
    # float32 sums (BLAS accumulates each batch's product; batches are few): half the memory
    # of float64 at a relative error ~1e-6, far below what the masks' damping tolerates.
    sums = {key: np.zeros((layer.reduction, layer.reduction), np.float32) for key, layer in readers.items()}
    counts = dict.fromkeys(sums, 0)
    for batch in data.batches(batch_size):
        outputs = dict(zip(names, session.run(names, batch)))
        for key, layer in readers.items():
            rows = layer_rows(layer, outputs[layer.node.inputs[0].name], rng, max_rows)
            if rows.shape[1] != layer.reduction:
                raise UsageError(
                    f"{layer.name}: captured input has {rows.shape[1]} columns, expected K={layer.reduction}"
                )
            sums[key] += rows.T @ rows
            counts[key] += rows.shape[0]
    del session
    # Stored float32 (36 MB at K = 3072); the mask methods promote to float64 per layer.
    shared = {key: LayerStats(gram=sums[key] / np.float32(max(counts[key], 1)), rows=counts[key])
              for key in sums}
    del sums
    release_freed_memory()
    result = {}
    for layer in chunk:
        result[layer.name] = shared[_capture_key(layer)]
        if progress is not None:
            progress(layer.name)
    return result
