"""Independent TensorRT 2:4 checker: re-read a written ONNX file and verify the layout rule.

Why independent: a 2:4 mask written along the wrong axis is the most common silent failure of
sparsity tools (DESIGN §3) — the file looks 50 % sparse, TensorRT quietly runs it dense. If the
checker shared the code that decides the reduction axis with the code that writes the masks, the
same bug would pass both. So this module uses only the ``onnx`` package (protobuf and
``onnx.numpy_helper``), never ``onnx_ir``, ``mpcompile.numerics`` or ``mpcompile.passes``, and
derives every reduction axis again from the ONNX operator semantics:

- ``MatMul(X, W)``, ``W`` constant ``[..., K, N]``: groups of 4 run down axis -2 for every output
  column (and every batch). A constant left operand ``A[..., M, K]`` reduces along axis -1.
- ``Gemm(A, B)``: B reduces along axis 0 (``transB=0``) or 1 (``transB=1``); a constant A along
  axis 1 (``transA=0``) or 0 (``transA=1``).
- ``Conv W[Cout, Cin/g, *k]``: for every (cout, kernel position), groups of 4 consecutive input
  channels; ``Cin % 4 == 0``; grouped / depthwise convs have no sparse kernels in TensorRT.

A weight may reach its consumer through Transpose / Cast / DequantizeLinear / Identity; the chain
is evaluated so the test runs on exactly the tensor the consumer sees, and the reduction axis is
mapped back through the Transpose permutations to name the stored axis in the report.

A legal group holds at most 2 nonzeros out of 4 (``-0.0`` counts as zero, NaN as nonzero). Only
nodes the rewrite marked (``metadata_props['mpcompile.sparsity'] == '2:4'``) can fail the check;
every other GEMM is reported too, as sparse-legal or dense, so a user sees what TensorRT will see.
A marked node whose constant weight cannot be found is reported as a failure, not skipped.
Subgraphs (If branches, Loop/Scan bodies) are walked recursively with ONNX's scoping (a body
reads an outer initializer or Constant by name); their layers are named by path,
``<node>/<attribute>/<node>`` (``If_0/then_branch/MatMul_3``). Functions are not walked.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper, helper, numpy_helper

from mpcompile.errors import ExternalDataError, InvalidModelError

if TYPE_CHECKING:  # rich is only needed to render
    from rich.console import Console

__all__ = [
    "SPARSITY_KEY",
    "SPARSE_24",
    "LayerCheck",
    "CheckReport",
    "check_model",
    "check_proto",
    "count_24_violations",
    "render_check_table",
]

logger = logging.getLogger(__name__)

SPARSITY_KEY = "mpcompile.sparsity"
SPARSE_24 = "2:4"
_GROUP = 4
_MAX_NONZERO = 2
_PASS_THROUGH = ("Transpose", "Cast", "DequantizeLinear", "Identity")
_ONNX_DOMAINS = ("", "ai.onnx")


@dataclass
class LayerCheck:
    """The 2:4 verdict for one GEMM/Conv weight, as TensorRT would group it.

    Attributes:
        node: node name (``<op>_<index>`` when the node is unnamed).
        op: MatMul / Gemm / Conv.
        weight: name of the stored tensor (initializer or Constant output).
        weight_shape: shape of the weight as the consumer receives it (after the chain).
        shape: the ``[out, K]`` matrix view; for Conv ``K = Cin/g · prod(kernel)``.
        reduction: where the groups of 4 run, in words.
        chain: ops between the stored tensor and the consumer, stored side first.
        dtype: ONNX element type of the stored tensor.
        eligible: whether TensorRT could run this layer with sparse weights at all.
        reason: why not, when ``eligible`` is False.
        marked: the rewrite marked the node 2:4 (only these can fail).
        groups: number of groups of 4 along the reduction (0 when the layout has none).
        violating_groups: groups with more than 2 nonzeros.
        density: fraction of nonzero weight entries.
        legal: eligible and no violating group.
    """

    node: str
    op: str
    weight: str
    weight_shape: tuple[int, ...]
    shape: tuple[int, int]
    reduction: str
    chain: list[str]
    dtype: str
    eligible: bool
    reason: str
    marked: bool
    groups: int
    violating_groups: int
    density: float
    legal: bool

    @property
    def failed(self) -> bool:
        """A marked layer that TensorRT would not run as 2:4."""
        return self.marked and not self.legal

    @property
    def verdict(self) -> str:
        if not self.eligible:
            return f"not eligible: {self.reason}"
        if self.legal:
            return "2:4 ✓"
        return "VIOLATES 2:4" if self.marked else "dense"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["weight_shape"] = list(self.weight_shape)
        data["shape"] = list(self.shape)
        data["failed"] = self.failed
        data["verdict"] = self.verdict
        return data


@dataclass
class CheckReport:
    """Per-layer verdicts for one model file; ``ok`` is what a pipeline gates on."""

    path: str
    layers: list[LayerCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(layer.failed for layer in self.layers)

    @property
    def marked(self) -> list[LayerCheck]:
        return [layer for layer in self.layers if layer.marked]

    @property
    def failures(self) -> list[LayerCheck]:
        return [layer for layer in self.layers if layer.failed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "summary": {
                "layers": len(self.layers),
                "marked": len(self.marked),
                "legal": sum(layer.legal for layer in self.layers),
                "failed": len(self.failures),
                "not_eligible": sum(not layer.eligible for layer in self.layers),
            },
            "layers": [layer.to_dict() for layer in self.layers],
        }


# ----------------------------------------------------------------------------- counting


def count_24_violations(weight: np.ndarray, axis: int) -> tuple[int, int]:
    """(groups, groups with > 2 nonzeros) for groups of 4 consecutive entries along ``axis``.

    The nonzero mask is taken first (1 byte per entry) so moving the axis copies booleans,
    not float weights. ``axis`` length must be a multiple of 4.
    """
    nonzero = np.asarray(weight) != 0  # -0.0 == 0; NaN != 0
    moved = np.moveaxis(nonzero, axis, -1)
    k = moved.shape[-1]
    if k % _GROUP:
        raise ValueError(f"reduction length {k} is not a multiple of {_GROUP}")
    if moved.size == 0:
        return 0, 0
    per_group = moved.reshape(-1, k // _GROUP, _GROUP).sum(axis=-1, dtype=np.int8)
    return int(per_group.size), int(np.count_nonzero(per_group > _MAX_NONZERO))


# ----------------------------------------------------------------------------- loading


STREAM_LOAD_BYTES = 64 * 2**20


def _load(path: Path) -> onnx.ModelProto:
    """Parse the model skeleton; external tensors are read one at a time later."""
    if not path.exists():
        raise InvalidModelError(f"{path}: no such file")
    if not path.is_file():
        raise InvalidModelError(f"{path}: not a file")
    try:
        if path.stat().st_size > STREAM_LOAD_BYTES:
            from mpcompile.io.proto_stream import load_skeleton

            model = load_skeleton(path)  # weights stay in the file, read one at a time
        else:
            model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidModelError(f"{path}: not a readable ONNX model ({first})") from exc
    if not model.HasField("graph") or model.ir_version == 0:
        raise InvalidModelError(f"{path}: not an ONNX model (no graph or IR version)")
    from mpcompile.checks.model_checks import check_text_fields, validate_tensors

    check_text_fields(model, str(path))
    validate_tensors(model, path.parent, inline_data=path.stat().st_size <= STREAM_LOAD_BYTES)
    _validate_external_data(model, path.parent)
    return model


def _validate_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Fail early, with the tensor's name, on external data that is missing or escapes the folder."""
    base = base_dir.resolve()
    sizes: dict[Path, int] = {}
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        if not location:
            raise ExternalDataError(f"tensor '{tensor.name}' uses external data without a location")
        if os.path.isabs(location):
            raise ExternalDataError(
                f"tensor '{tensor.name}': external data location '{location}' is an absolute path"
            )
        target = (base / location).resolve()
        if not target.is_relative_to(base):
            raise ExternalDataError(
                f"tensor '{tensor.name}': external data location '{location}' escapes the model's folder"
            )
        if target not in sizes:
            if not target.is_file():
                raise ExternalDataError(
                    f"tensor '{tensor.name}': external data file '{location}' not found next to the model"
                )
            sizes[target] = target.stat().st_size
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else None
        except ValueError as exc:
            raise ExternalDataError(f"tensor '{tensor.name}': bad external data offset/length") from exc
        end = offset + (length or 0)
        if offset > sizes[target] or end > sizes[target]:
            raise ExternalDataError(
                f"tensor '{tensor.name}': external data '{location}' is truncated "
                f"(needs bytes {offset}..{end}, file has {sizes[target]})"
            )


# ----------------------------------------------------------------------------- graph walking


@dataclass
class _Weight:
    """A constant traced back from a GEMM input."""

    name: str
    tensor: onnx.TensorProto
    chain: list[onnx.NodeProto]  # stored side first


class _Graph:
    """Name → initializer / producer maps for one graph scope.

    A subgraph (If branch, Loop/Scan body) is a child scope: a name it neither produces nor
    declares (as an input or initializer) is read from the enclosing graph, as ONNX resolves
    outer-scope values, so a weight stored as an outer initializer is found from inside.
    """

    def __init__(self, model: onnx.ModelProto, base_dir: Path, *,
                 graph: onnx.GraphProto | None = None, parent: _Graph | None = None) -> None:
        self.graph = model.graph if graph is None else graph
        self.base_dir = base_dir
        self.parent = parent
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.local_inputs = {v.name for v in self.graph.input} - set(self.initializers)
        self.producers: dict[str, onnx.NodeProto] = {}
        for node in self.graph.node:
            for out in node.output:
                if out:
                    self.producers[out] = node

    def child(self, body: onnx.GraphProto) -> _Graph:
        return _Graph(onnx.ModelProto(), self.base_dir, graph=body, parent=self)

    def _owner(self, name: str) -> _Graph | None:
        """The innermost scope that defines ``name`` (None: nobody, e.g. a missing input)."""
        scope: _Graph | None = self
        while scope is not None:
            if name in scope.producers or name in scope.initializers or name in scope.local_inputs:
                return scope
            scope = scope.parent
        return None

    def producer(self, name: str) -> onnx.NodeProto | None:
        owner = self._owner(name)
        return owner.producers.get(name) if owner is not None else None

    def constant(self, name: str) -> onnx.TensorProto | None:
        """The stored tensor for ``name`` if it is an initializer or a Constant's output."""
        if not name:
            return None
        owner = self._owner(name)
        if owner is None:
            return None
        producer = owner.producers.get(name)
        if producer is None:
            return owner.initializers.get(name)
        if producer.op_type == "Constant" and producer.domain in _ONNX_DOMAINS:
            for attr in producer.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    return attr.t
        return None

    def trace(self, name: str) -> _Weight | None:
        """Follow pass-through ops back to a stored constant, or None if the input is computed."""
        chain: list[onnx.NodeProto] = []
        seen: set[str] = set()
        while name and name not in seen:
            seen.add(name)
            tensor = self.constant(name)
            if tensor is not None:
                return _Weight(name, tensor, list(reversed(chain)))
            producer = self.producer(name)
            if (
                producer is None
                or producer.op_type not in _PASS_THROUGH
                or producer.domain not in _ONNX_DOMAINS
                or not producer.input
            ):
                return None
            if producer.op_type == "DequantizeLinear" and not all(
                self.constant(param) is not None for param in producer.input[1:3] if param
            ):
                return None  # computed scale / zero point: not a constant weight
            chain.append(producer)
            name = producer.input[0]
        return None

    def array(self, tensor: onnx.TensorProto) -> np.ndarray:
        try:
            return numpy_helper.to_array(tensor, base_dir=str(self.base_dir))
        except (OSError, ValueError, TypeError) as exc:
            message = f"tensor '{tensor.name}': cannot read its data ({exc})"
            if external_data_helper.uses_external_data(tensor):
                raise ExternalDataError(message) from exc
            raise InvalidModelError(message) from exc

    def evaluate(self, weight: _Weight) -> np.ndarray:
        """The weight exactly as its consumer receives it."""
        arr = self.array(weight.tensor)
        for node in weight.chain:
            if node.op_type == "Transpose":
                arr = np.transpose(arr, _perm(node, arr.ndim))
            elif node.op_type == "Cast":
                to = _attr(node, "to", None)
                if to is not None:
                    arr = arr.astype(helper.tensor_dtype_to_np_dtype(int(to)))
            elif node.op_type == "DequantizeLinear":
                arr = self._dequantize(node, arr)
        return arr

    def _dequantize(self, node: onnx.NodeProto, x: np.ndarray) -> np.ndarray:
        scale_t = self.constant(node.input[1]) if len(node.input) > 1 else None
        if scale_t is None:  # trace() only lets constant-parameter DequantizeLinear through
            raise InvalidModelError(f"DequantizeLinear '{node.name}': scale is missing")
        scale = self.array(scale_t).astype(np.float32)
        zp_t = self.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        zero = self.array(zp_t).astype(np.float32) if zp_t is not None else None
        axis = int(_attr(node, "axis", 1))
        block = int(_attr(node, "block_size", 0))
        out = x.astype(np.float32)
        if zero is not None:
            out = out - _expand_quant_param(zero, out.shape, axis, block)
        return out * _expand_quant_param(scale, out.shape, axis, block)


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _perm(node: onnx.NodeProto, ndim: int) -> list[int]:
    perm = _attr(node, "perm", None)
    return [int(p) for p in perm] if perm else list(reversed(range(ndim)))


def _expand_quant_param(param: np.ndarray, shape: tuple[int, ...], axis: int, block: int) -> np.ndarray:
    """Broadcast a per-tensor / per-axis / blocked quantization parameter to ``shape``."""
    if param.size == 1:
        return param.reshape(())
    axis %= len(shape)
    if block > 0 and param.ndim == len(shape):
        return np.repeat(param, block, axis=axis)[tuple(slice(0, d) for d in shape)]
    view = [1] * len(shape)
    view[axis] = param.size
    return param.reshape(view)


def _stored_axis(chain: list[onnx.NodeProto], axis: int, ndim: int) -> int:
    """Map an axis of the consumer's view back to the stored tensor through Transposes."""
    for node in reversed(chain):  # consumer side first
        if node.op_type == "Transpose":
            axis = _perm(node, ndim)[axis]
    return axis


def _node_names(graph: onnx.GraphProto) -> list[str]:
    names, seen = [], set()
    for index, node in enumerate(graph.node):
        base = node.name or f"{node.op_type}_{index}"
        name, suffix = base, 1
        while name in seen:
            name, suffix = f"{base}#{suffix}", suffix + 1
        seen.add(name)
        names.append(name)
    return names


def _bodies(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    """(name, graph) of each subgraph attribute; a GRAPHS list names its items ``name[i]``."""
    out: list[tuple[str, onnx.GraphProto]] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            out.append((attr.name, attr.g))
        elif attr.type == onnx.AttributeProto.GRAPHS:
            out.extend((f"{attr.name}[{i}]", body) for i, body in enumerate(attr.graphs))
    return out


def _is_marked(node: onnx.NodeProto) -> bool:
    return any(p.key == SPARSITY_KEY and p.value.strip() == SPARSE_24 for p in node.metadata_props)


def _dims(shape: tuple[int, ...]) -> str:
    return ",".join(str(d) for d in shape)


# ----------------------------------------------------------------------------- per-op rules


@dataclass
class _Rule:
    """Where TensorRT's groups run for one consumer, before counting."""

    weight: _Weight
    axis: int  # in the consumer's view
    out: int
    k: int
    reduction: str
    eligible: bool = True
    reason: str = ""


def _matmul_rule(g: _Graph, node: onnx.NodeProto, shape_of) -> _Rule | None:
    if len(node.input) < 2:
        return None
    weight = g.trace(node.input[1])
    if weight is not None:
        shape = shape_of(weight)
        if len(shape) == 1:
            return _Rule(weight, 0, 1, shape[0], "axis 0 of W[K]")
        k = shape[-2]
        out = int(np.prod(shape, dtype=np.int64)) // max(k, 1)
        desc = "axis 0 of W[K,N]" if len(shape) == 2 else "axis -2 of W[...,K,N]"
        return _Rule(weight, len(shape) - 2, out, k, desc)
    weight = g.trace(node.input[0])
    if weight is None:
        return None
    shape = shape_of(weight)
    k = shape[-1]
    out = int(np.prod(shape, dtype=np.int64)) // max(k, 1)
    desc = "axis 1 of A[M,K] (constant left operand)" if len(shape) == 2 else "axis -1 of A[...,M,K]"
    return _Rule(weight, len(shape) - 1, out, k, desc)


def _gemm_rule(g: _Graph, node: onnx.NodeProto, shape_of) -> _Rule | None:
    if len(node.input) < 2:
        return None
    trans_b = int(_attr(node, "transB", 0))
    weight = g.trace(node.input[1])
    if weight is not None:
        shape = shape_of(weight)
        if len(shape) != 2:
            return None
        axis = 1 if trans_b else 0
        layout = "B[N,K]" if trans_b else "B[K,N]"
        return _Rule(weight, axis, shape[1 - axis], shape[axis], f"axis {axis} of {layout} (transB={trans_b})")
    trans_a = int(_attr(node, "transA", 0))
    weight = g.trace(node.input[0])
    if weight is None:
        return None
    shape = shape_of(weight)
    if len(shape) != 2:
        return None
    axis = 0 if trans_a else 1
    layout = "A[K,M]" if trans_a else "A[M,K]"
    return _Rule(weight, axis, shape[1 - axis], shape[axis],
                 f"axis {axis} of {layout} (transA={trans_a}, constant left operand)")


def _conv_rule(g: _Graph, node: onnx.NodeProto, shape_of) -> _Rule | None:
    if len(node.input) < 2:
        return None
    weight = g.trace(node.input[1])
    if weight is None:
        return None
    shape = shape_of(weight)
    if len(shape) < 3:
        return None
    cout, cin_g, kernel = shape[0], shape[1], shape[2:]
    where = {1: "(k)", 2: "(kh,kw)", 3: "(kd,kh,kw)"}.get(len(kernel), "kernel position")
    rule = _Rule(weight, 1, cout, cin_g * int(np.prod(kernel, dtype=np.int64)), f"Cin at each {where}")
    group = int(_attr(node, "group", 1))
    if group > 1:
        kind = "depthwise" if cin_g == 1 else "grouped"
        rule.eligible = False
        rule.reason = f"{kind} conv (group={group}); TensorRT has no sparse grouped convolution"
    return rule


_RULES = {"MatMul": _matmul_rule, "Gemm": _gemm_rule, "Conv": _conv_rule}


# ----------------------------------------------------------------------------- entry points


def check_proto(model: onnx.ModelProto, base_dir: str | Path = ".", path: str = "<memory>") -> CheckReport:
    """Check an already parsed model; external tensors are read from ``base_dir`` one by one."""
    report = CheckReport(path=path)

    def shape_of(weight: _Weight) -> tuple[int, ...]:
        shape = tuple(int(d) for d in weight.tensor.dims)
        for node in weight.chain:
            if node.op_type == "Transpose":
                shape = tuple(shape[i] for i in _perm(node, len(shape)))
        return shape

    def walk(g: _Graph, prefix: str) -> None:
        for node, name in zip(g.graph.node, _node_names(g.graph)):
            rule_fn = _RULES.get(node.op_type) if node.domain in _ONNX_DOMAINS else None
            rule = rule_fn(g, node, shape_of) if rule_fn is not None else None
            if rule is not None:
                report.layers.append(_check_layer(g, node, prefix + name, rule, shape_of(rule.weight)))
            elif _is_marked(node):
                report.layers.append(_unresolved_layer(node, prefix + name, rule_fn is not None))
            for attr_name, body in _bodies(node):  # If branches, Loop/Scan bodies
                walk(g.child(body), f"{prefix}{name}/{attr_name}/")

    walk(_Graph(model, Path(base_dir)), "")
    logger.info(
        "checked %d GEMM/Conv layers in %s: %d marked 2:4, %d failed",
        len(report.layers), path, len(report.marked), len(report.failures),
    )
    return report


def _check_layer(g: _Graph, node: onnx.NodeProto, name: str, rule: _Rule, shape: tuple[int, ...]) -> LayerCheck:
    arr = g.evaluate(rule.weight)
    if tuple(arr.shape) != shape:
        raise InvalidModelError(
            f"node '{name}': weight '{rule.weight.name}' has shape {arr.shape}, dims say {shape}"
        )
    ndim = len(shape)
    stored = _stored_axis(rule.weight.chain, rule.axis, ndim)
    reduction = rule.reduction
    if rule.weight.chain and stored != rule.axis:
        stored_shape = tuple(int(d) for d in rule.weight.tensor.dims)
        reduction += f"; stored {rule.weight.name}[{_dims(stored_shape)}] axis {stored}"
    eligible, reason = rule.eligible, rule.reason
    red_len = shape[rule.axis]
    groups = violating = 0
    if red_len % _GROUP:
        what = "Cin" if node.op_type == "Conv" else "K"
        reason = reason or f"{what}={red_len} is not a multiple of {_GROUP}"
        eligible = False
    else:
        groups, violating = count_24_violations(arr, rule.axis)
    density = float(np.count_nonzero(arr) / arr.size) if arr.size else 0.0
    return LayerCheck(
        node=name,
        op=node.op_type,
        weight=rule.weight.name,
        weight_shape=shape,
        shape=(int(rule.out), int(rule.k)),
        reduction=reduction,
        chain=[n.op_type for n in rule.weight.chain],
        dtype=onnx.TensorProto.DataType.Name(rule.weight.tensor.data_type),
        eligible=eligible,
        reason=reason,
        marked=_is_marked(node),
        groups=groups,
        violating_groups=violating,
        density=density,
        legal=eligible and groups > 0 and violating == 0,
    )


def _unresolved_layer(node: onnx.NodeProto, name: str, known_op: bool) -> LayerCheck:
    """A node marked 2:4 whose weight the checker cannot find: the mark itself is a bug."""
    reason = (
        "marked 2:4 but its weight is not a constant (initializer / Constant through "
        "Transpose, Cast, DequantizeLinear, Identity)"
        if known_op
        else f"marked 2:4 but {node.op_type} has no TensorRT sparse-weight path"
    )
    return LayerCheck(
        node=name, op=node.op_type, weight="", weight_shape=(), shape=(0, 0), reduction="–",
        chain=[], dtype="", eligible=False, reason=reason, marked=True, groups=0,
        violating_groups=0, density=0.0, legal=False,
    )


def check_model(path: str | Path) -> CheckReport:
    """Re-read ``path`` from disk and check every GEMM/Conv weight against TensorRT's 2:4 rule.

    Raises:
        InvalidModelError: missing file, not ONNX, or a malformed quantization chain.
        ExternalDataError: external tensor data missing, truncated or outside the model's folder.
    """
    p = Path(path)
    model = _load(p)
    return check_proto(model, base_dir=p.resolve().parent, path=str(p))


# ----------------------------------------------------------------------------- rendering


def render_check_table(report: CheckReport, console: Console) -> None:
    """Print one row per layer; failing marked layers in red so they stand out in CI logs."""
    from rich.table import Table

    table = Table(title=f"2:4 check — {report.path}", show_lines=False)
    for column, justify in (
        ("layer", "left"), ("op", "left"), ("shape", "right"), ("reduction", "left"),
        ("density", "right"), ("violating groups", "right"), ("verdict", "left"),
    ):
        table.add_column(column, justify=justify, overflow="fold")
    for layer in report.layers:
        if layer.failed:
            style = "bold red"
        elif not layer.eligible:
            style = "yellow" if layer.marked else "dim"
        elif layer.legal:
            style = "green"
        else:
            style = ""
        violating = f"{layer.violating_groups}/{layer.groups}" if layer.groups else "–"
        table.add_row(
            layer.node + (" *" if layer.marked else ""),
            layer.op,
            f"{layer.shape[0]}×{layer.shape[1]}",
            layer.reduction,
            f"{layer.density:.1%}",
            violating,
            layer.verdict,
            style=style,
        )
    console.print(table)
    marked, failed = len(report.marked), len(report.failures)
    status = "[green]OK[/green]" if report.ok else f"[bold red]FAILED[/bold red] ({failed} of {marked} marked layers)"
    console.print(f"{len(report.layers)} layers, {marked} marked 2:4 (*): {status}")
