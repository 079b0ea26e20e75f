"""Find the GEMM-like layers of a model and view each weight the way TensorRT groups it.

Why this is its own module: every later stage (spectral fit, mask writing, permutation,
reports) must agree on *which* nodes are GEMMs and on the ``out × reduction`` matrix view
of their weights, because a 2:4 mask written along the wrong axis is the most common silent
failure of existing tools. The independent checker (``mpcompile.checks.checker``) deliberately
re-derives the same facts without importing this module.

Matrix view (DESIGN §3):
- ``MatMul(X, W[K, N])`` → ``W.T`` (``[N, K]``): groups of 4 run down axis 0 of W.
- ``Gemm(A, B, transB=0)`` → ``B.T``; ``transB=1`` → ``B`` (``[N, K]``).
- ``Conv W[Cout, Cin/g, *k]`` → ``W.transpose(0, 2.., 1).reshape(Cout, -1)``: reduction
  ordered ``(kh, kw, Cin)`` with Cin fastest, so 4 consecutive reduction elements are 4
  input channels at one kernel position.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from mpcompile.errors import UnsupportedModelError

__all__ = [
    "WeightSource",
    "GemmLayer",
    "discover_gemms",
    "display_names",
    "node_subgraphs",
    "subgraph_display_names",
    "MIN_REDUCTION",
]

logger = logging.getLogger(__name__)

# TensorRT only considers sparse tactics for reductions of at least this size; an RGB stem
# (Cin = 3) or a tiny K gains nothing and usually fails the multiple-of-4 rule anyway.
MIN_REDUCTION = 16
_PASS_THROUGH = {"Transpose", "Cast", "DequantizeLinear", "Identity"}
_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


@dataclass
class WeightSource:
    """A constant weight as the consuming GEMM sees it, traced back to its stored tensor.

    Attributes:
        root: the initializer (or Constant output) that stores the weight.
        chain: the Transpose/Cast/DequantizeLinear/Identity nodes from root to consumer,
            root side first.
        stored_dtype: dtype of the stored tensor.
    """

    root: ir.Value
    chain: list[ir.Node]
    stored_dtype: ir.DataType

    @property
    def quantized(self) -> bool:
        return any(n.op_type == "DequantizeLinear" for n in self.chain)

    def stored_tensor(self) -> ir.TensorProtocol:
        """The stored tensor object (initializer or Constant value), without reading its data."""
        tensor = self.root.const_value
        if tensor is None:  # Constant node output
            producer = self.root.producer()
            assert producer is not None and producer.op_type == "Constant"
            tensor = producer.attributes["value"].as_tensor()
        return tensor

    def stored_array(self) -> np.ndarray:
        return self.stored_tensor().numpy()

    def effective_shape(self) -> tuple[int, ...]:
        """Shape of the weight as the consumer sees it (Transpose chain applied), no data read."""
        tensor = self.root.const_value
        if tensor is None:
            tensor = self.root.producer().attributes["value"].as_tensor()
        shape = tuple(int(d) for d in tensor.shape)
        for node in self.chain:
            if node.op_type == "Transpose":
                perm = node.attributes.get_ints("perm", None) or list(reversed(range(len(shape))))
                shape = tuple(shape[i] for i in perm)
        return shape

    def effective_array(self, stored: np.ndarray | None = None) -> np.ndarray:
        """The weight as the consumer receives it (chain applied), as float.

        ``stored`` replaces the current stored data (e.g. a tensor the weight had before a rewrite).
        """
        arr = self.stored_array() if stored is None else stored
        if arr.dtype.kind not in "fiu":
            raise UnsupportedModelError(
                f"weight '{self.root.name}' has unsupported dtype {self.stored_dtype.name}"
            )
        for node in self.chain:
            if node.op_type == "Transpose":
                perm = node.attributes.get_ints("perm", None)
                arr = np.transpose(arr, perm) if perm is not None else arr.T
            elif node.op_type == "DequantizeLinear":
                arr = _dequantize(node, arr)
            # Cast / Identity: the float view below is enough for analysis.
        return np.asarray(arr, dtype=np.float32) if arr.dtype != np.float64 else arr


def _const_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].as_tensor().numpy()
    return None


def _dequantize(node: ir.Node, arr: np.ndarray) -> np.ndarray:
    scale = _const_array(node.inputs[1] if len(node.inputs) > 1 else None)
    zero = _const_array(node.inputs[2] if len(node.inputs) > 2 else None)
    if scale is None:
        raise ValueError(f"DequantizeLinear {node.name}: non-constant scale")
    axis = node.attributes.get_int("axis", 1)
    x = arr.astype(np.float32)
    if zero is not None:
        x = x - _broadcast_axis(zero.astype(np.float32), x.ndim, axis)
    return x * _broadcast_axis(scale.astype(np.float32), x.ndim, axis)


def _broadcast_axis(param: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    if param.ndim == 0 or param.size == 1:
        return param.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = param.size
    return param.reshape(shape)


def trace_weight(value: ir.Value | None) -> WeightSource | None:
    """Follow pass-through ops back from a GEMM input to a stored constant, or None."""
    chain: list[ir.Node] = []
    current = value
    while current is not None:
        if current.const_value is not None and (current.is_initializer() or current.producer() is None):
            return WeightSource(current, list(reversed(chain)), current.const_value.dtype)
        producer = current.producer()
        if producer is None:
            return None  # a graph input: not a constant weight
        if producer.op_type == "Constant":
            attr = producer.attributes.get("value")
            if attr is None:
                return None
            return WeightSource(current, list(reversed(chain)), attr.as_tensor().dtype)
        if producer.op_type in _PASS_THROUGH and producer.domain in ("", "ai.onnx"):
            chain.append(producer)
            current = producer.inputs[0]
            continue
        return None
    return None


@dataclass
class GemmLayer:
    """One GEMM-like node and the facts every stage needs about it.

    Attributes:
        name: unique display name (node name, or ``<op>_<index>`` when unnamed).
        node: the ONNX IR node.
        op_type: MatMul / Gemm / Conv.
        weight: where the constant weight comes from.
        weight_input: index of the weight among the node inputs.
        out_features, reduction: the ``out × K`` matrix shape TensorRT groups.
        in_channels: Cin (per group) for Conv, K for MatMul/Gemm; permutations act on it.
        kernel: spatial kernel shape for Conv, () otherwise.
        group: Conv group count (1 for MatMul/Gemm).
        macs: multiply-accumulates per inference at the analysed input shapes, or None.
        eligible: whether this layer may be made 2:4; ``reason`` says why not.
        shared_with: names of the other layers reading the same stored weight.
    """

    name: str
    node: ir.Node
    op_type: str
    weight: WeightSource
    weight_input: int
    out_features: int
    reduction: int
    in_channels: int
    kernel: tuple[int, ...] = ()
    group: int = 1
    layout: str = ""
    macs: int | None = None
    eligible: bool = True
    reason: str = ""
    shared_with: list[str] = field(default_factory=list)

    @property
    def weight_key(self) -> str:
        return self.weight.root.name or f"<unnamed:{id(self.weight.root)}>"

    def matrix(self, stored: np.ndarray | None = None) -> np.ndarray:
        """The weight as ``[out, K]`` with K in TensorRT grouping order (of ``stored`` if given)."""
        w = self.weight.effective_array(stored)
        return weight_to_matrix(w, self.layout)

    def matrix_of(self, tensor: ir.TensorProtocol) -> np.ndarray:
        """``[out, K]`` view of a tensor this layer's weight once held (read on demand)."""
        return self.matrix(tensor.numpy())


def weight_to_matrix(w: np.ndarray, layout: str) -> np.ndarray:
    """Map an effective weight array to its ``[out, K]`` TensorRT view (see module doc)."""
    if layout in ("matmul", "gemm_transB0"):
        return np.ascontiguousarray(w.T)
    if layout == "gemm_transB1":
        return np.ascontiguousarray(w)
    if layout == "conv":
        order = (0, *range(2, w.ndim), 1)
        return np.ascontiguousarray(np.transpose(w, order).reshape(w.shape[0], -1))
    raise ValueError(f"unknown layout {layout!r}")


def display_names(graph: ir.Graph) -> dict[ir.Node, str]:
    """Unique, stable names for nodes (ONNX allows empty and duplicate node names)."""
    names: dict[ir.Node, str] = {}
    seen: set[str] = set()
    for index, node in enumerate(graph):
        base = node.name or f"{node.op_type}_{index}"
        name = base
        suffix = 1
        while name in seen:
            name = f"{base}#{suffix}"
            suffix += 1
        seen.add(name)
        names[node] = name
    return names


def subgraph_display_names(graph: ir.Graph, prefix: str = "") -> dict[ir.Node, str]:
    """Display names of every node in ``graph`` and, recursively, in its If/Loop/Scan bodies.

    A subgraph node is named by the path to it, ``<parent>/<attribute>/<node>``
    (``If_0/then_branch/MatMul_3``): names are unique per graph, so paths are unique across
    the model, and the report says which body a layer lives in. The checker derives the same
    names independently.
    """
    names: dict[ir.Node, str] = {}
    for node, name in display_names(graph).items():
        names[node] = prefix + name
        for attr_name, body in node_subgraphs(node):
            names.update(subgraph_display_names(body, f"{prefix}{name}/{attr_name}/"))
    return names


def node_subgraphs(node: ir.Node) -> list[tuple[str, ir.Graph]]:
    """(attribute name, body) of each graph attribute of ``node`` (GRAPHS lists get ``name[i]``)."""
    bodies: list[tuple[str, ir.Graph]] = []
    for attr in node.attributes.values():
        if not isinstance(attr, ir.Attr):
            continue  # a reference attribute (inside a function) holds no graph
        if attr.type == ir.AttributeType.GRAPH:
            bodies.append((attr.name, attr.as_graph()))
        elif attr.type == ir.AttributeType.GRAPHS:
            bodies.extend((f"{attr.name}[{i}]", body) for i, body in enumerate(attr.as_graphs()))
    return bodies


def _make_layer(node: ir.Node, name: str) -> GemmLayer | None:
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return None
    if op == "MatMul":
        source = trace_weight(node.inputs[1])
        if source is None:
            if trace_weight(node.inputs[0]) is not None:
                logger.debug("%s: constant left operand, skipped", name)
            return None
        shape = source.effective_shape()
        if len(shape) != 2:
            return _ineligible_layer(node, name, source, 1, shape, "matmul",
                                     f"batched constant weight of rank {len(shape)}")
        k, n = shape
        return GemmLayer(name, node, op, source, 1, n, k, k, layout="matmul")
    if op == "Gemm":
        source = trace_weight(node.inputs[1])
        if source is None:
            return None
        trans_b = node.attributes.get_int("transB", 0)
        shape = source.effective_shape()
        if len(shape) != 2:
            return None
        layout = "gemm_transB1" if trans_b else "gemm_transB0"
        n, k = shape if trans_b else shape[::-1]
        return GemmLayer(name, node, op, source, 1, n, k, k, layout=layout)
    if op == "Conv":
        source = trace_weight(node.inputs[1])
        if source is None:
            return None
        shape = source.effective_shape()
        if len(shape) < 3:
            return None
        cout, cin_per_group, *kernel = shape
        group = node.attributes.get_int("group", 1)
        reduction = int(cin_per_group * np.prod(kernel))
        return GemmLayer(name, node, op, source, 1, cout, reduction, cin_per_group,
                         kernel=tuple(int(k) for k in kernel), group=group, layout="conv")
    return None


def _ineligible_layer(node, name, source, idx, shape, layout, reason) -> GemmLayer:
    return GemmLayer(name, node, node.op_type, source, idx, int(shape[-1]), int(shape[-2]),
                     int(shape[-2]), layout=layout, eligible=False, reason=reason)


def _terminal_uses(root: ir.Value) -> list[tuple[ir.Node, int]]:
    """Uses of a stored weight seen through pass-through ops (the nodes that consume it)."""
    out: list[tuple[ir.Node, int]] = []
    stack = [root]
    while stack:
        value = stack.pop()
        for use in value.uses():
            node, index = use.node, use.idx
            if node.op_type in _PASS_THROUGH and index == 0:
                stack.extend(node.outputs)
            else:
                out.append((node, index))
    return out


def _eligibility(layer: GemmLayer) -> tuple[bool, str]:
    if not layer.eligible:
        return False, layer.reason
    if layer.weight.quantized:
        return False, "quantized weight (DequantizeLinear): analysed, but rewriting int8 weights is not supported"
    if layer.weight.stored_dtype not in _FLOAT_TYPES:
        return False, f"non-float weight ({layer.weight.stored_dtype.name})"
    if layer.op_type == "Conv" and layer.group > 1:
        kind = "depthwise" if layer.in_channels == 1 else "grouped"
        return False, f"{kind} conv (group={layer.group}): TensorRT has no sparse grouped conv"
    if layer.in_channels % 4 != 0:
        what = "Cin" if layer.op_type == "Conv" else "K"
        return False, f"{what}={layer.in_channels} is not a multiple of 4"
    if layer.in_channels < MIN_REDUCTION:
        what = "Cin" if layer.op_type == "Conv" else "K"
        return False, f"{what}={layer.in_channels} < {MIN_REDUCTION}: too small to gain from 2:4"
    if layer.out_features < MIN_REDUCTION:
        what = "Cout" if layer.op_type == "Conv" else "N"
        return False, f"{what}={layer.out_features} < {MIN_REDUCTION}: too few outputs to gain from 2:4"
    return True, ""


def discover_gemms(
    model: ir.Model,
    output_shapes: dict[str, tuple[int, ...]] | None = None,
) -> list[GemmLayer]:
    """All MatMul/Gemm nodes with a constant weight and all Conv nodes, in graph order.

    Args:
        model: the model. The top-level graph and, recursively, the bodies of its
            If/Loop/Scan nodes are walked: exporters keep layers there, with weights that are
            outer-scope initializers (captured values) or Constants local to the body. A
            weight read by both branches of an If is one stored weight shared by two layers.
            Functions are not walked.
        output_shapes: static shapes of node outputs by value name (from shape inference),
            used to count MACs; missing shapes leave ``macs`` as None.
    """
    names = subgraph_display_names(model.graph)
    layers = [layer for node, name in names.items() if (layer := _make_layer(node, name)) is not None]
    gemm_nodes = {layer.node: layer for layer in layers}

    by_root: dict[int, list[GemmLayer]] = {}
    for layer in layers:
        by_root.setdefault(id(layer.weight.root), []).append(layer)
    for group in by_root.values():
        for layer in group:
            layer.shared_with = [other.name for other in group if other is not layer]
        foreign = [
            (node, idx)
            for node, idx in _terminal_uses(group[0].weight.root)
            if node not in gemm_nodes or idx != gemm_nodes[node].weight_input
        ]
        layouts = {(layer.layout, layer.reduction) for layer in group}
        for layer in group:
            ok, reason = _eligibility(layer)
            if ok and foreign:
                node = foreign[0][0]
                ok, reason = False, f"weight shared with a {node.op_type} node ({node.name or 'unnamed'})"
            elif ok and len(layouts) > 1:
                ok, reason = False, "weight shared by GEMMs that reduce along different axes"
            layer.eligible, layer.reason = ok, reason

    if output_shapes:
        for layer in layers:
            layer.macs = _macs(layer, output_shapes)
    return layers


def _macs(layer: GemmLayer, shapes: dict[str, tuple[int, ...]]) -> int | None:
    out = layer.node.outputs[0]
    shape = shapes.get(out.name)
    if shape is None or any(not isinstance(d, int) or d < 0 for d in shape):
        return None
    per_output = layer.reduction  # Conv: Cin/group·kh·kw; GEMM: K
    return int(np.prod(shape, dtype=np.int64)) * int(per_output)
