"""Checks on a parsed model before anything trusts its declared sizes, types or values.

Why: a fuzz campaign over mutated files (``benchmarks/fuzz.py``) found that the ONNX checker
lets through tensors whose data disagree with their dims or dtype, external-data entries
with unparsable offsets or files shorter than the tensor (no ``length`` given), type clashes
only ONNX Runtime noticed (on the unmodified model: a bad input, see
:func:`dense_model_errors`), and NaN weights that reached the MP fit: each ended in an
"internal error" deep inside numpy or ONNX Runtime. Every check here compares *declared*
sizes with the bytes actually present, using Python integers, so a tensor that claims 2^62
elements is refused before a single byte is allocated.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper

from mpcompile.errors import ExternalDataError, InvalidModelError, MpcompileError, UnsupportedModelError

__all__ = [
    "validate_tensors",
    "require_finite",
    "require_finite_inputs",
    "require_usable_weights",
    "check_text_fields",
    "check_graph_inputs",
    "dense_model_errors",
    "MAX_INPUT_ELEMENTS",
]

# A graph input declaring more elements than this (per sample batch) cannot be calibrated or
# validated on any machine we run on: refuse it instead of trying to allocate it.
MAX_INPUT_ELEMENTS = 2**33
_FINITE_CHUNK = 1 << 20

_BITS = {
    TensorProto.FLOAT: 32, TensorProto.UINT8: 8, TensorProto.INT8: 8, TensorProto.UINT16: 16,
    TensorProto.INT16: 16, TensorProto.INT32: 32, TensorProto.INT64: 64, TensorProto.BOOL: 8,
    TensorProto.FLOAT16: 16, TensorProto.DOUBLE: 64, TensorProto.UINT32: 32, TensorProto.UINT64: 64,
    TensorProto.COMPLEX64: 64, TensorProto.COMPLEX128: 128, TensorProto.BFLOAT16: 16,
}
for _name, _bits in (("FLOAT8E4M3FN", 8), ("FLOAT8E4M3FNUZ", 8), ("FLOAT8E5M2", 8), ("FLOAT8E5M2FNUZ", 8),
                     ("UINT4", 4), ("INT4", 4), ("FLOAT4E2M1", 4)):
    if hasattr(TensorProto, _name):
        _BITS[getattr(TensorProto, _name)] = _bits
_KNOWN_TYPES = set(_BITS) | {TensorProto.STRING}

# Which typed field holds a dtype's values when raw_data is absent, and how many entries per element.
_INT32_FIELD = {TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT16, TensorProto.UINT8,
                TensorProto.BOOL, TensorProto.FLOAT16, TensorProto.BFLOAT16}


def _typed_count(t: TensorProto) -> tuple[str, int] | None:
    """(field, entries) of the typed field that holds ``t``'s data, if any is filled."""
    for name in ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data"):
        n = len(getattr(t, name))
        if n:
            return name, n
    return None


def _expected_typed(dtype: int, count: int) -> tuple[str, int] | None:
    if dtype == TensorProto.FLOAT:
        return "float_data", count
    if dtype == TensorProto.COMPLEX64:
        return "float_data", 2 * count
    if dtype == TensorProto.DOUBLE:
        return "double_data", count
    if dtype == TensorProto.COMPLEX128:
        return "double_data", 2 * count
    if dtype == TensorProto.INT64:
        return "int64_data", count
    if dtype in (TensorProto.UINT32, TensorProto.UINT64):
        return "uint64_data", count
    if dtype == TensorProto.STRING:
        return "string_data", count
    if _BITS.get(dtype) == 4:
        return "int32_data", (count + 1) // 2
    if dtype in _INT32_FIELD or _BITS.get(dtype) == 8:
        return "int32_data", count
    return None


def _parse_int(tensor: TensorProto, info: dict[str, str], key: str) -> int | None:
    if key not in info:
        return None
    try:
        value = int(info[key])
    except ValueError:
        raise ExternalDataError(
            f"tensor '{tensor.name}': external data {key} '{info[key]}' is not a whole number") from None
    if value < 0:
        raise ExternalDataError(f"tensor '{tensor.name}': external data {key} {value} is negative")
    return value


def _check_external(tensor: TensorProto, needed: int | None, base: Path, sizes: dict[Path, int]) -> None:
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    if not location:
        raise ExternalDataError(f"tensor '{tensor.name}' uses external data without a location")
    if os.path.isabs(location) or Path(location).is_absolute():
        raise ExternalDataError(
            f"tensor '{tensor.name}': external data location '{location}' is an absolute path; "
            "only paths inside the model's folder are allowed")
    target = (base / location).resolve()  # resolves symlinks: a link out of the folder escapes
    if not target.is_relative_to(base):
        raise ExternalDataError(
            f"tensor '{tensor.name}': external data location '{location}' escapes the model's folder {base}")
    link = next((part for part in [base / location, *(base / location).parents] if part.is_symlink()), None)
    if link is not None and link.is_relative_to(base) and link != base:
        # The ONNX library refuses symlinked external data (a link can be re-pointed after
        # this check); refusing it here gives every command the same one-line answer.
        raise ExternalDataError(
            f"tensor '{tensor.name}': external data location '{location}' is a symbolic link "
            f"({link.name} -> {os.readlink(link)}); copy the data file into the model's folder")
    if target not in sizes:
        if not target.is_file():
            raise ExternalDataError(
                f"tensor '{tensor.name}': external data file '{location}' not found next to the model")
        sizes[target] = target.stat().st_size
    offset = _parse_int(tensor, info, "offset") or 0
    length = _parse_int(tensor, info, "length")
    if length is not None and needed is not None and length != needed:
        raise ExternalDataError(
            f"tensor '{tensor.name}': external data length {length} does not match its dims and type "
            f"({needed} bytes)")
    span = length if length is not None else needed
    if span is not None and offset + span > sizes[target]:
        raise ExternalDataError(
            f"tensor '{tensor.name}': external data file '{location}' is truncated "
            f"(needs bytes {offset}..{offset + span}, file has {sizes[target]})")


def validate_tensors(proto: onnx.ModelProto, base_dir: Path, *, inline_data: bool = True) -> None:
    """Refuse any tensor (initializer or Constant, subgraphs included) whose dims, dtype and data disagree.

    ``inline_data=False`` skips the comparison with in-file data (for a skeleton whose weights
    were left in the file by a streamed reader); external data is always checked.
    """
    base = Path(base_dir).resolve()
    sizes: dict[Path, int] = {}
    for tensor in external_data_helper._get_all_tensors(proto):
        name = tensor.name or "<unnamed>"
        if tensor.data_type not in _KNOWN_TYPES:
            kind = InvalidModelError if tensor.data_type == TensorProto.UNDEFINED or \
                tensor.data_type not in TensorProto.DataType.values() else UnsupportedModelError
            raise kind(f"tensor '{name}' has an unknown or unsupported data type {tensor.data_type}")
        if any(d < 0 for d in tensor.dims):
            raise InvalidModelError(f"tensor '{name}' has a negative dimension {list(tensor.dims)}")
        count = math.prod(tensor.dims)  # Python int: no overflow, nothing allocated
        bits = _BITS.get(tensor.data_type)
        needed = None if bits is None else (count * bits + 7) // 8
        if external_data_helper.uses_external_data(tensor):
            _check_external(tensor, needed, base, sizes)
            continue
        if not inline_data:
            continue
        if tensor.HasField("raw_data"):
            if needed is not None and len(tensor.raw_data) != needed:
                raise InvalidModelError(
                    f"tensor '{name}': raw_data has {len(tensor.raw_data)} bytes, its dims {list(tensor.dims)} "
                    f"and type need {needed}")
            continue
        found = _typed_count(tensor)
        expected = _expected_typed(tensor.data_type, count)
        if found is None:
            if count:
                raise InvalidModelError(f"tensor '{name}' declares {count} elements but holds no data")
            continue
        if expected is None or found != expected:
            raise InvalidModelError(
                f"tensor '{name}': {found[0]} has {found[1]} entries, its dims {list(tensor.dims)} and type "
                f"need {expected[1] if expected else 'none'}" + (f" in {expected[0]}" if expected else ""))


def check_graph_inputs(proto: onnx.ModelProto) -> None:
    """Refuse graph inputs whose fixed dims multiply past :data:`MAX_INPUT_ELEMENTS`.

    A ``dim_value`` of 0 or below is how Paddle and some TF converters write a dynamic dim
    (``-1``): it is treated as dynamic (shapes.py), so only the positive dims count here.
    """
    for value in proto.graph.input:
        if not value.type.HasField("tensor_type"):
            continue
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim if d.HasField("dim_value") and d.dim_value > 0]
        if math.prod(dims) > MAX_INPUT_ELEMENTS:
            raise UnsupportedModelError(
                f"input '{value.name}' declares {math.prod(dims):.3g} elements per inference "
                f"(dims {dims}); more than {MAX_INPUT_ELEMENTS:.3g} cannot be calibrated or validated")


def require_finite(array: np.ndarray, what: str, *, error: type = InvalidModelError) -> None:
    """Refuse NaN or ±Inf in ``array`` with one line naming ``what`` and how many entries."""
    if array.dtype.kind not in "fc" or array.size == 0:
        return
    flat = array.reshape(-1)
    # In slices: a boolean mask of a whole embedding table would cost as much memory as a weight.
    if all(np.isfinite(flat[i: i + _FINITE_CHUNK]).all() for i in range(0, flat.size, _FINITE_CHUNK)):
        return
    finite = np.isfinite(flat)
    bad = int(array.size - np.count_nonzero(finite))
    nan = int(np.count_nonzero(np.isnan(array)))
    raise error(f"{what} holds {bad} non-finite value(s) ({nan} NaN, {bad - nan} ±Inf) of {array.size}; "
                "mpcompile needs finite numbers")


@contextlib.contextmanager
def dense_model_errors(what: str = "the input model") -> Iterator[None]:
    """Turn an ONNX Runtime failure on the *unmodified* model into a one-line bad-input error.

    Why only there: if ONNX Runtime cannot load or run the model the user gave us, the model is
    at fault (exit 3); a failure on a model mpcompile rewrote stays an internal error.
    """
    from mpcompile.io.runner import runtime_error_line

    try:
        yield
    except Exception as exc:
        first = runtime_error_line(exc)
        if first is None:
            raise
        raise InvalidModelError(f"ONNX Runtime cannot run {what}: {first[:400]}") from exc


def require_usable_weights(model) -> None:
    """Every GEMM/Conv weight the analysis will read must be non-empty and finite.

    Why refuse rather than skip: an MP fit of a NaN matrix fails deep in LAPACK, and a model
    with a NaN weight produces NaN outputs, so any report about it would be meaningless.
    """
    from mpcompile.lazy_weights import release
    from mpcompile.passes.gemm_discovery import discover_gemms

    seen: set[int] = set()
    for layer in discover_gemms(model):
        root = layer.weight.root
        if id(root) in seen:
            continue
        seen.add(id(root))
        tensor = layer.weight.stored_tensor()
        name = root.name or layer.name
        if math.prod(tensor.shape.numpy()) == 0:
            raise InvalidModelError(f"weight '{name}' of layer '{layer.name}' has no elements "
                                    f"(shape {list(tensor.shape.numpy())})")
        try:
            array = tensor.numpy()
        except (ValueError, TypeError) as exc:
            raise InvalidModelError(f"weight '{name}' of layer '{layer.name}': cannot read its data ({exc})") from exc
        require_finite(array, f"weight '{name}' of layer '{layer.name}'")
        del array
        release(tensor)  # one weight resident at a time, not the whole model (lazy_weights)


def require_finite_inputs(data) -> None:
    """Calibration/evaluation arrays must be finite: NaN statistics would make every mask and
    every reported drift NaN without a word. ``data`` is a :class:`~mpcompile.io.calibration.CalibrationData`."""
    for name, array in data.inputs.items():
        require_finite(array, f"calibration input '{name}' ({data.source})", error=MpcompileError)


def check_text_fields(message, where: str = "model") -> None:
    """Refuse a string field (name, op_type, domain, doc...) that is not valid UTF-8.

    Why: protobuf's Python runtime hands such a proto2 string back as ``bytes``, which then
    breaks the first ``str`` operation far from the cause (a flipped byte in a node name ended
    in a TypeError while printing the check table). Only message and string fields are walked,
    never the numeric payloads, so this costs per field, not per weight byte.
    """
    from google.protobuf.descriptor import FieldDescriptor

    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_STRING:
            values = value if field.is_repeated else (value,)
            if any(isinstance(v, bytes) for v in values):
                raise InvalidModelError(f"{where}: field '{field.name}' is not valid UTF-8 text "
                                        "(a corrupted or non-ONNX file)")
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            items = value if field.is_repeated else (value,)
            for index, item in enumerate(items):
                label = getattr(item, "name", "") if isinstance(getattr(item, "name", ""), str) else ""
                check_text_fields(item, f"{where} > {field.name}[{label or index}]")
