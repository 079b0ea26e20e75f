"""Loading and saving models safely: validated input, atomic output, never touch the input.

Why: mpcompile runs as a step in deployment pipelines, where a half-written output or a
model whose external data silently points at ``/etc/passwd`` is worse than a clear
failure. Every problem with the input becomes a one-line :class:`MpcompileError`.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from mpcompile.errors import InvalidModelError
from mpcompile.checks.model_checks import check_graph_inputs, check_text_fields, validate_tensors
from mpcompile.io.proto_stream import write_inline_streamed  # noqa: F401  (re-exported for callers)
from mpcompile.io.shapes import weightless_copy

__all__ = ["LoadedModel", "load_model", "save_model", "default_output_path", "TWO_GB"]

logger = logging.getLogger(__name__)

TWO_GB = 2**31
# Above this many bytes of weights a model is written with external data: protobuf cannot
# serialize a message of 2 GB, and big single files are slow to diff and copy anyway.
EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)
FULL_CHECK_BYTES = 64 * 2**20


@dataclass
class LoadedModel:
    """A model read from disk.

    Attributes:
        path: the file it came from (resolved).
        model: the onnx_ir model every pass works on. External tensors are memory-mapped
            lazily from ``path``'s folder.
        proto: the ModelProto as parsed, with the data of large initializers left out (their
            names, types and dims stay): ONNX shape inference needs no more, and the parsed
            weights would otherwise stay in memory beside ``model``'s own copy all compile long.
    """

    path: Path
    model: ir.Model
    proto: onnx.ModelProto

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def _external_tensors(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [
        t
        for t in external_data_helper._get_all_tensors(proto)
        if external_data_helper.uses_external_data(t)
    ]


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Read and validate an ONNX model; raise a one-line MpcompileError on any problem."""
    p = Path(path)
    if not p.exists():
        raise InvalidModelError(f"{p}: no such file")
    if p.is_dir():
        raise InvalidModelError(f"{p}: is a folder, expected an .onnx file")
    if p.stat().st_size == 0:
        raise InvalidModelError(f"{p}: file is empty")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        raise InvalidModelError(
            f"{p}: not a valid ONNX file (protobuf parse failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from exc
    except OSError as exc:
        raise InvalidModelError(f"{p}: cannot read file ({exc.strerror or exc})") from exc
    if not proto.HasField("graph") or (len(proto.graph.node) == 0 and not proto.opset_import):
        raise InvalidModelError(f"{p}: not a valid ONNX file (no graph found; truncated or not ONNX?)")
    check_text_fields(proto, str(p))
    # Declared sizes vs bytes present, before anything is allocated; external data: location inside
    # the folder, no symlink, offsets and lengths within the file.
    validate_tensors(proto, p.parent)
    check_graph_inputs(proto)
    try:
        # Structural check only: the weights may be external and are validated above.
        # Small models are checked whole. Big ones (or external data, validated above) are
        # checked as a weight-free skeleton: the checker would otherwise serialise every
        # weight, doubling peak memory on a multi-GB model for no structural information.
        small = p.stat().st_size <= FULL_CHECK_BYTES and not _external_tensors(proto)
        onnx.checker.check_model(proto if small else weightless_copy(proto), full_check=False)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise InvalidModelError(f"{p}: ONNX checker rejected the model: {first}") from exc
    except ValueError as exc:
        # check_model refuses in-memory protos over 2 GB; those were loaded without external
        # data so this only happens for truly huge embedded graphs.
        logger.debug("checker skipped: %s", exc)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx_ir raises a variety of errors on malformed graphs
        raise InvalidModelError(f"{p}: cannot build the IR: {exc}") from exc
    ir.external_data.set_base_dir(model.graph, str(p.parent))
    _detach_from_proto(model)
    return LoadedModel(path=p.resolve(), model=model, proto=_without_weight_data(proto))


# Types whose numpy array round-trips exactly through ir.Tensor; others stay proto-backed.
_PLAIN_DTYPES = frozenset({
    ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.INT8, ir.DataType.UINT8,
    ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32, ir.DataType.UINT32, ir.DataType.INT64,
    ir.DataType.UINT64, ir.DataType.BOOL,
})


def _detached(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    if not isinstance(tensor, ir.serde.TensorProtoTensor) or tensor.dtype not in _PLAIN_DTYPES:
        return tensor
    return ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name, doc_string=tensor.doc_string,
                     metadata_props=dict(tensor.metadata_props))


def _detach_from_proto(model: ir.Model) -> None:
    """Give every main-graph initializer and Constant its own numpy array.

    Why: a tensor that wraps the parsed protobuf keeps the *whole* parsed model alive, so a
    weight replaced by a rewrite would never be freed and a compile would hold the input's
    weights to the end. Detached, each replaced weight is released as soon as nothing uses it.
    """
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            value.const_value = _detached(value.const_value)
    for node in model.graph:
        attr = node.attributes.get("value") if node.op_type == "Constant" else None
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            node.attributes["value"] = ir.AttrTensor("value", _detached(attr.as_tensor()))


def _without_weight_data(proto: onnx.ModelProto, max_elements: int = 1024) -> onnx.ModelProto:
    """``proto`` with the data of initializers above ``max_elements`` dropped (names, types, dims kept)."""
    out = onnx.ModelProto()
    _copy_fields(proto, out, skip="graph")
    _copy_fields(proto.graph, out.graph, skip="initializer")
    for tensor in proto.graph.initializer:
        if math.prod(tensor.dims) <= max_elements or onnx.external_data_helper.uses_external_data(tensor):
            out.graph.initializer.append(tensor)
        else:
            out.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    return out


def _copy_fields(src, dst, skip: str) -> None:
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        target = getattr(dst, field.name)
        if field.is_repeated:
            target.extend(value)
        elif field.message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def default_output_path(input_path: str | os.PathLike, suffix: str) -> Path:
    """``model.onnx`` (or ``model.pt2``) → ``model.<suffix>.onnx`` next to the input."""
    p = Path(input_path)
    stem = next((p.name[: -len(ext)] for ext in (".onnx", ".pt2") if p.name.endswith(ext)), p.name)
    return p.with_name(f"{stem}.{suffix}.onnx")


def _weight_bytes(model: ir.Model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            total += tensor.nbytes
    return total


def save_model(
    model: ir.Model,
    out_path: str | os.PathLike,
    *,
    protect: tuple[str | os.PathLike, ...] = (),
    external_data: bool | None = None,
    force: bool = True,
) -> Path:
    """Write ``model`` atomically and self-contained to ``out_path``; return the absolute path.

    One-output form of :class:`mpcompile.io.outputs.RunOutputs` (the commands use that directly, to
    commit a model and its reports together): the model and its external data are staged in a
    hidden folder beside the destination and committed in an order no reader can observe half
    done. Every tensor the model needs is written next to it, never referenced from the input.

    Args:
        protect: input files no output may be (the input model; its external data is added).
        external_data: force external data on/off; default: on above ~1.8 GB of weights.
        force: replace an existing ``out_path`` (the CLI asks for ``--force``).
    """
    from mpcompile.io.outputs import RunOutputs, protected_files

    use_external = external_data if external_data is not None else _weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    with RunOutputs([f for p in protect for f in protected_files(p)], force=force) as outputs:
        out = outputs.add(out_path, "-o")
        outputs.save_model(model, out, external_data=use_external)
        outputs.commit()
    logger.info("wrote %s%s", out, " (+ external data)" if use_external else "")
    return out
