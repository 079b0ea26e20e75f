"""Write and read big inline ONNX files one tensor at a time, at the protobuf wire level.

Writing (:func:`write_inline_streamed`): building the whole ModelProto and serialising it holds
two extra copies of every weight. Protobuf merges repeated occurrences of an embedded message
field, so the file is written as the model without its main-graph initializers followed by one
``graph { initializer {…} }`` record per tensor; every ONNX reader (onnx, ONNX Runtime,
TensorRT's parser) reads it as the same model.

Reading (:func:`load_skeleton`): ``onnx.load`` reads the whole file into bytes and then parses it, two copies of every
weight at once. The independent checker needs one weight at a time, so it parses a skeleton:
the file is walked at the protobuf wire level (through ``mmap``, pages are only touched, not
copied) and each main-graph initializer's ``raw_data`` is replaced by an external-data
reference ``(this file, offset, length)``. ``numpy_helper.to_array`` then reads each tensor on
demand, exactly as for a model saved with external data.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.internal.encoder import _VarintBytes

from mpcompile.lazy_weights import release

__all__ = ["load_skeleton", "write_inline_streamed", "write_external_streamed"]

_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9
_TENSOR_EXTERNAL_DATA = 13
_TENSOR_DATA_LOCATION = 14


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """``(field, wire type, field start, value start, value end)`` of each field in ``buf[start:end]``."""
    pos = start
    while pos < end:
        key, value_start = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, value_end = _varint(buf, value_start)
        elif wire == 1:
            value_end = value_start + 8
        elif wire == 2:
            length, value_start = _varint(buf, value_start)
            value_end = value_start + length
        elif wire == 5:
            value_end = value_start + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if value_end > end:
            raise ValueError("truncated field")
        yield field, wire, pos, value_start, value_end
        pos = value_end


def _message(field: int, payload: bytes) -> bytes:
    return _VarintBytes(field << 3 | 2) + _VarintBytes(len(payload)) + payload


def _entry(key: str, value: str) -> bytes:
    return _message(_TENSOR_EXTERNAL_DATA, _message(1, key.encode()) + _message(2, value.encode()))


def _tensor_stub(buf, start: int, end: int, location: str) -> bytes:
    """The tensor's fields with ``raw_data`` swapped for an external reference into the file."""
    kept, raw = bytearray(), None
    for field, _wire, field_start, value_start, value_end in _fields(buf, start, end):
        if field == _TENSOR_RAW_DATA:
            raw = (value_start, value_end)
        else:
            kept += buf[field_start:value_end]
    if raw is None:
        return bytes(buf[start:end])
    kept += _entry("location", location) + _entry("offset", str(raw[0])) + _entry("length", str(raw[1] - raw[0]))
    kept += _VarintBytes(_TENSOR_DATA_LOCATION << 3) + _VarintBytes(onnx.TensorProto.EXTERNAL)
    return bytes(kept)


def load_skeleton(path: str | Path) -> onnx.ModelProto:
    """Parse ``path`` with every main-graph initializer's data left in the file (see module doc).

    Raises ``ValueError`` on a file that is not well-formed protobuf.
    """
    p = Path(path)
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        model, graph, has_graph = bytearray(), bytearray(), False
        for field, wire, field_start, value_start, value_end in _fields(buf, 0, len(buf)):
            if field != _MODEL_GRAPH or wire != 2:
                model += buf[field_start:value_end]
                continue
            has_graph = True
            for g_field, g_wire, g_start, v_start, v_end in _fields(buf, value_start, value_end):
                if g_field == _GRAPH_INITIALIZER and g_wire == 2:
                    graph += _message(_GRAPH_INITIALIZER, _tensor_stub(buf, v_start, v_end, p.name))
                else:
                    graph += buf[g_start:v_end]
    if has_graph:
        model += _message(_MODEL_GRAPH, bytes(graph))
    return onnx.ModelProto.FromString(bytes(model))


def _tensor_proto(name: str, tensor: ir.TensorProtocol) -> onnx.TensorProto:
    """``tensor`` with its data inline: a tensor read lazily from the *input's* external-data
    file is copied, so no output ever points at a file that is not its own."""
    if isinstance(tensor, ir.ExternalTensor):
        proto = onnx.TensorProto(name=name, dims=[int(d) for d in tensor.shape], data_type=int(tensor.dtype))
        proto.raw_data = tensor.tobytes()
        return proto
    proto = ir.serde.serialize_tensor(tensor)
    proto.name = name
    return proto


@contextmanager
def _head_without_external(model: ir.Model) -> Iterator[None]:
    """Swap every external tensor outside the main-graph initializers (subgraph initializers,
    Constant values) for an in-memory copy while the head is serialised, then put it back."""
    undo = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                tensor = attr.value
                node.attributes[attr.name] = ir.AttrTensor(attr.name, ir.Tensor(tensor.numpy(), dtype=tensor.dtype,
                                                                                 name=tensor.name))
                undo.append(lambda n=node, a=attr: n.attributes.__setitem__(a.name, a))
            graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else (
                list(attr.value) if attr.type == ir.AttributeType.GRAPHS else [])
            for sub in graphs:
                for value in sub.initializers.values():
                    if isinstance(value.const_value, ir.ExternalTensor):
                        tensor = value.const_value
                        value.const_value = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name)
                        undo.append(lambda v=value, t=tensor: setattr(v, "const_value", t))
    try:
        yield
    finally:
        for restore in reversed(undo):
            restore()


def _head(model: ir.Model) -> tuple[bytes, list[ir.Value]]:
    """The serialised model without its main-graph initializers, and those initializers."""
    graph = model.graph
    initializers = list(graph.initializers.values())
    for value in initializers:
        graph.initializers.pop(value.name)
    try:
        with _head_without_external(model):
            head = ir.serde.serialize_model(model).SerializeToString()
    finally:
        for value in initializers:
            graph.initializers[value.name] = value
    return head, [v for v in initializers if v.const_value is not None]


def _record(tensor: onnx.TensorProto) -> bytes:
    return _message(_MODEL_GRAPH, _message(_GRAPH_INITIALIZER, tensor.SerializeToString()))


def write_inline_streamed(model: ir.Model, path: str | os.PathLike) -> None:
    """Write ``model`` as one self-contained ONNX file, one initializer at a time (see module doc):
    the peak extra memory is one tensor instead of two copies of every weight, and a weight read
    lazily (memory-mapped) is unmapped once written."""
    head, initializers = _head(model)
    with open(path, "wb") as f:
        f.write(head)
        for value in initializers:
            f.write(_record(_tensor_proto(value.name, value.const_value)))
            release(value.const_value)  # a lazily read weight is unmapped once copied


EXTERNAL_MIN_BYTES = 1024
_ALIGN = 64


def write_external_streamed(model: ir.Model, path: str | os.PathLike) -> str | None:
    """Write ``model`` to ``path`` with every main-graph initializer of at least 1 KiB in one new
    external-data file beside it, one tensor at a time; return that file's name (None: no tensor
    was big enough).

    The data file is named ``<path name>.<sha256[:16]>.data`` after its content, so a new graph
    never shares a data-file name with an older graph of different weights (see
    :mod:`mpcompile.io.outputs` for why), and the same weights give the same file.
    """
    out = Path(path)
    head, initializers = _head(model)
    tmp_data = out.with_name(out.name + ".data.partial")
    digest = hashlib.sha256()
    stubs: list[tuple[onnx.TensorProto, tuple[int, int] | None]] = []
    offset = 0
    with open(tmp_data, "wb") as data:
        for value in initializers:
            tensor = value.const_value
            if tensor.nbytes < EXTERNAL_MIN_BYTES or tensor.dtype == ir.DataType.STRING:
                stubs.append((_tensor_proto(value.name, tensor), None))
                continue
            pad = b"\0" * (-offset % _ALIGN)
            raw = tensor.tobytes()
            data.write(pad)
            data.write(raw)
            digest.update(pad)
            digest.update(raw)
            release(tensor)  # a lazily read weight is unmapped once copied: one resident at a time
            offset += len(pad)
            stubs.append((onnx.TensorProto(name=value.name, dims=[int(d) for d in tensor.shape],
                                           data_type=int(tensor.dtype)), (offset, len(raw))))
            offset += len(raw)
            del raw
    if all(span is None for _, span in stubs):
        tmp_data.unlink()
        name = None
    else:
        name = f"{out.name}.{digest.hexdigest()[:16]}.data"
        os.replace(tmp_data, out.with_name(name))
    with open(out, "wb") as f:
        f.write(head)
        for tensor, span in stubs:
            if span is not None:
                for key, value in (("location", name), ("offset", str(span[0])), ("length", str(span[1]))):
                    tensor.external_data.add(key=key, value=value)
                tensor.data_location = onnx.TensorProto.EXTERNAL
            f.write(_record(tensor))
    return name
