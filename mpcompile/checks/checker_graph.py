"""The checker's view of an ONNX graph: constant weights through their Transpose/Cast/
DequantizeLinear chains, subgraph scoping, and the per-operator reduction-axis rules.

Why apart from ``checker.py``: that module is the report and its entry points; this one is
the graph reading they rest on. Like it, it uses only the ``onnx`` package (see the
independence rule in ``checker.py``'s docstring).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper

from mpcompile.errors import ExternalDataError, InvalidModelError

SPARSITY_KEY = "mpcompile.sparsity"
SPARSE_24 = "2:4"
_PASS_THROUGH = ("Transpose", "Cast", "DequantizeLinear", "Identity")
_ONNX_DOMAINS = ("", "ai.onnx")

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
