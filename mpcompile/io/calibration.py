"""Calibration: model inputs (user data or stated synthetic) and the ONNX Runtime sessions
that run them; ``capture.py`` builds the per-layer statistics on top of these sessions.

Why statistics and not activations: CAST, Wanda and SparseGPT need only the second moment
``XᵀX/rows`` of each layer's input (in TensorRT's reduction order), which is ``K²`` memory
whatever the calibration size; one pass of ONNX Runtime over the calibration batches
captures every layer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from mpcompile.errors import UsageError
from mpcompile.io.shapes import ShapeSpec

# The ONNX Runtime side lives in ``runner.py``; re-exported here, where callers always found it.
from mpcompile.io.runner import ModelRunner, release_freed_memory, run_model, run_slice  # noqa: F401

__all__ = [
    "CalibrationData",
    "ModelRunner",
    "load_calibration",
    "run_model",
    "run_slice",
    "synthetic_inputs",
]

logger = logging.getLogger(__name__)

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
    shared: frozenset[str] = frozenset()  # inputs without a sample axis (scalars, KV caches): fed whole
    # Set when the model declares a dynamic batch but ONNX Runtime runs it only one sample at a
    # time (an export that hard-codes batch 1 in a Reshape): said in the report.
    batch_fallback: str | None = None

    @property
    def samples(self) -> int:
        batched = [v for k, v in self.inputs.items() if v.ndim > 0 and k not in self.shared]
        return int(batched[0].shape[0]) if batched else 1

    @property
    def covered(self) -> int:
        """Samples the batches cover: a static batch drops the tail that would not fill one."""
        return self.samples - self.samples % self.static_batch if self.static_batch else self.samples

    def require_covered(self) -> int:
        """:attr:`covered`, refusing data too short for even one static batch."""
        if self.static_batch and self.covered == 0:
            raise UsageError(
                f"the model has a static batch of {self.static_batch} but only {self.samples} samples were given"
            )
        return self.covered

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches in order; a model exported with a static batch gets exactly that size."""
        size = self.static_batch or batch_size
        for start in range(0, self.require_covered(), size):
            yield self.slice(start, start + size)

    def slice(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {k: v if v.ndim == 0 or k in self.shared else v[start:stop] for k, v in self.inputs.items()}

    @property
    def used_labels(self) -> np.ndarray | None:
        """Labels of the samples that :meth:`batches` yields (a static batch drops the tail)."""
        if self.labels is None:
            return None
        return self.labels[: self.covered] if self.static_batch else self.labels


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
    from mpcompile.checks.user_checks import check_input_arrays, check_labels

    check_input_arrays(f"--calib {p}", model, inputs)
    if labels is not None:
        labels = np.asarray(labels)[:limit]
        check_labels(f"--calib {p}", labels, counts.pop())
    return CalibrationData(inputs=inputs, source=f"file:{p}", labels=labels, static_batch=static_batch(model))


def static_batch(model: ir.Model) -> int | None:
    """The first dimension shared by all model inputs when it is a fixed number, else None."""
    dims = set()
    for value in _graph_inputs(model):
        if value.shape is None or len(value.shape) == 0:
            return None
        first = value.shape[0]
        if not isinstance(first, int) or first <= 0:  # Paddle/TF write -1 (or 0) for "dynamic"
            return None
        dims.add(first)
    return dims.pop() if len(dims) == 1 else None


# Ops an integer id passes through unchanged in value on its way to a Gather (TF/Paddle
# exports cast, reshape and unsqueeze ids before the embedding lookup).
_ID_PASS_THROUGH = frozenset({"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand",
                              "Transpose"})


def _gather_table_rows(model: ir.Model, value: ir.Value, depth: int = 8) -> int | None:
    """Rows of the smallest constant table that ``value`` (possibly after casts/reshapes)
    indexes with Gather: ids drawn below it are legal for every lookup they feed."""
    rows: list[int] = []
    for use in value.uses():
        node = use.node
        if node.op_type == "Gather" and use.idx == 1:
            table = node.inputs[0]
            if table is not None and table.const_value is not None:
                axis = node.attributes.get_int("axis", 0)
                rows.append(int(table.const_value.shape[axis]))
        elif node.op_type in _ID_PASS_THROUGH and use.idx == 0 and depth > 0:
            for out in node.outputs:
                found = _gather_table_rows(model, out, depth - 1)
                if found is not None:
                    rows.append(found)
    return min(rows) if rows else None


def _dims_of(value: ir.Value, spec: ShapeSpec) -> list[int]:
    """Static dims of ``value``: symbolic, unknown and non-positive (Paddle's -1) dims take
    the ``--dim`` value or the default."""
    if value.name in spec.inputs:
        return list(spec.inputs[value.name])
    shape = []
    for dim in value.shape or []:
        if isinstance(dim, int):
            shape.append(dim if dim > 0 else spec.default)
        else:
            shape.append(spec.dims.get(str(dim), spec.default))
    return shape


def _integer_input(model: ir.Model, value: ir.Value, shape: list[int], dtype, rng: np.random.Generator) -> np.ndarray:
    """Legal synthetic ids: masks of ones, token-type ids of zeros, position ids 0..n-1, token
    ids below the row count of the embedding table they index (UsageError when unknown)."""
    lname = value.name.lower()
    if "mask" in lname:
        return np.ones(shape, dtype=dtype)
    if "type" in lname:
        return np.zeros(shape, dtype=dtype)
    if "position" in lname or lname.endswith("pos_ids"):
        if not shape:
            return np.zeros(shape, dtype=dtype)
        return np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
    high = _gather_table_rows(model, value)
    if high is None:
        raise UsageError(
            f"integer input '{value.name}': its legal range cannot be read from the graph (it indexes no "
            "constant embedding table); pass real inputs with --calib"
        )
    return rng.integers(0, high, size=shape).astype(dtype)


def synthetic_inputs(model: ir.Model, spec: ShapeSpec, samples: int = 32, seed: int = 0) -> CalibrationData:
    """Data-free mode: N(0,1) floats; integer inputs as legal ids (see :func:`_integer_input`).
    Stated in every report as synthetic."""
    rng = np.random.default_rng(seed)
    inputs: dict[str, np.ndarray] = {}
    values = _graph_inputs(model)
    batch = static_batch(model)
    # Inputs with no sample axis: scalars, and (without a static batch) inputs whose first dim
    # is fixed while others' is dynamic, like a KV cache [layers, batch, heads, past, dim].
    # They are fed whole with a single sample, the batch dims at their --dim/default value.
    shared = frozenset(
        v.name for v in values if v.name not in spec.inputs and v.shape is not None
        and (len(v.shape) == 0 or (batch is None and isinstance(v.shape[0], int) and v.shape[0] > 0)))
    if shared:
        samples = 1
    for value in values:
        shape = _dims_of(value, spec)
        if batch:
            samples = max(batch, samples - samples % batch)
        if value.name not in shared:
            shape[0:1] = [samples] if shape else []
        dtype = _NP_DTYPES.get(value.dtype, np.float32)
        if np.issubdtype(dtype, np.floating):
            arr = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            arr = np.ones(shape, dtype=dtype)
        else:
            arr = _integer_input(model, value, shape, dtype, rng)
        inputs[value.name] = arr
    return CalibrationData(inputs=inputs, source=f"synthetic: {samples} samples, N(0,1) floats, seed {seed}",
                           static_batch=batch, shared=shared)


def shapes_from_calibration(spec: ShapeSpec, model: ir.Model, data: CalibrationData) -> ShapeSpec:
    """``spec`` with every dynamic dim the user did not set taken from the calibration arrays.

    Why: the analysis (MACs, modeled speedup) should be at the shapes the model is used at,
    e.g. 128-token sequences, not at the default of 1 per dynamic dim. The leading dim of
    the arrays counts samples, not a batch size, so it stays as ``--dim``/the default says.
    """
    result = ShapeSpec(inputs=dict(spec.inputs), dims=dict(spec.dims), default=spec.default)
    for value in _graph_inputs(model):
        array = data.inputs.get(value.name)
        if value.name in spec.inputs or array is None or value.shape is None or array.ndim != len(value.shape):
            continue
        for axis, dim in enumerate(value.shape):
            if axis == 0 or (isinstance(dim, int) and dim > 0):
                continue
            if not isinstance(dim, int) and str(dim) not in result.dims:
                result.dims[str(dim)] = int(array.shape[axis])
        if any(isinstance(dim, int) and dim <= 0 for dim in value.shape[1:]):  # unnamed: pin the input
            first = value.shape[0]
            lead = first if isinstance(first, int) and first > 0 else (
                spec.dims.get(str(first), spec.default) if not isinstance(first, int) else spec.default)
            result.inputs[value.name] = (lead, *(int(d) for d in array.shape[1:]))
    return result
