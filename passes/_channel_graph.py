"""Which nodes a permutation of one tensor's channel axis reaches, and what blocks it.

Math: write ``x[..., perm]`` for a tensor whose channel axis is reordered by ``perm``. An op
``f`` is *channel-equivariant* when ``f(x[perm]) = f'(x)[perm]`` with ``f'`` equal to ``f``
except that its per-channel constants are taken as ``c[perm]``: elementwise activations,
Add/Mul/... with a broadcast constant, BatchNorm, pooling over spatial axes, LayerNorm (its
mean and variance over the axis do not depend on the order) and depthwise convs all qualify.
So a producer GEMM whose output channels are emitted as ``perm``, followed by any chain (or
diamond, like a decomposed GELU) of such ops, delivers ``x[perm]`` to every consumer; each
consumer then reads its weight's input-channel axis in the same order. The *region* is the
set of tensors carrying that order: it is closed forward from the producer's output, and
every use of a region tensor must be a consumer GEMM or another equivariant op whose
non-constant inputs are all in the region. Anything else (a residual Add whose other operand
comes from elsewhere, a Reshape into heads, a Concat, a graph output) would see the new order
and change the model's function, so it blocks the fold with a reason.

Length (~450 lines): the reach walk and its blocking rules are one algorithm over one region;
split, each half would need the other's private state to be read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import onnx_ir as ir

from mpcompile.passes.gemm_discovery import GemmLayer, trace_weight

__all__ = [
    "CONSUMER_WEIGHT_AXIS", "ChannelAxis", "ConstEdit", "Region", "analyse_region", "classify",
    "consumer_axis",
    "effective_shape",
]

logger = logging.getLogger(__name__)

_UNARY = frozenset(
    "Relu Gelu Sigmoid Tanh Erf Clip Cast Identity Dropout Softplus LeakyRelu Elu Selu Celu "
    "HardSigmoid HardSwish Mish Softsign Abs Neg Exp Log Sqrt Reciprocal Sin Cos Floor Ceil Round "
    "Sign ThresholdedRelu".split()
)
_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "PRelu", "Max", "Min"})
_CHANNEL_PARAMS = frozenset({"BatchNormalization", "InstanceNormalization"})  # 1-D params, axis 1
_POOLS = frozenset(
    "MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool".split()
)
_INVARIANT = frozenset({"Shape", "Size"})  # read only the shape: blind to channel order
_EXTRA_OUTPUTS_OK = frozenset({"Dropout"})  # its mask has the data's shape: same order
# Layout → axis of the *effective* weight (the array the node receives) that holds channels.
_PRODUCER_AXIS = {"matmul": 1, "gemm_transB0": 1, "gemm_transB1": 0, "conv": 0}
CONSUMER_WEIGHT_AXIS = {"matmul": 0, "gemm_transB0": 0, "gemm_transB1": 1, "conv": 1}


@dataclass(frozen=True)
class ConstEdit:
    """Permute input ``index`` of ``node`` (a constant) along ``axis`` of the array it sees."""

    node: ir.Node
    index: int
    axis: int
    role: str


@dataclass(frozen=True)
class ChannelAxis:
    """The permuted axis, counted from the end (right-aligned like ONNX broadcasting).

    ``rank`` is the tensor rank when known; BatchNorm and pooling need it to check that the
    permuted axis is axis 1.
    """

    axis: int
    rank: int | None
    channels: int

    @property
    def is_axis1(self) -> bool:
        return self.rank is not None and self.axis == 1 - self.rank


@dataclass
class Region:
    producer: ir.Node | None = None
    through: list[ir.Node] = field(default_factory=list)
    consumers: list[GemmLayer] = field(default_factory=list)
    edits: list[ConstEdit] = field(default_factory=list)
    reason: str = ""


class _Blocked(Exception):
    """Carries the reason a fold is impossible up to ``analyse_region``."""


def _name(node: ir.Node) -> str:
    return node.name or node.op_type


def _is_const(value: ir.Value | None) -> bool:
    return value is None or trace_weight(value) is not None


def _is_const_expr(value: ir.Value | None, depth: int = 8) -> bool:
    """Whether ``value`` is computed from constants only (an unfolded constant subgraph)."""
    if _is_const(value):
        return True
    node = value.producer()
    if depth == 0 or node is None or value.is_graph_input():
        return False
    return all(_is_const_expr(v, depth - 1) for v in node.inputs)


def _unfolded(node: ir.Node, value: ir.Value) -> _Blocked:
    maker = value.producer()
    return _Blocked(
        f"{node.op_type} '{_name(node)}' has a parameter computed by "
        f"{maker.op_type if maker else '?'} from constants: run constant folding first"
    )


def effective_shape(value: ir.Value) -> tuple[int, ...]:
    """Shape of a constant as the reading node sees it (through its Transpose chain)."""
    source = trace_weight(value)
    if source is None:
        raise _Blocked(f"'{value.name}' is not a constant")
    if source.quantized:
        raise _Blocked(f"'{source.root.name}' is quantized (DequantizeLinear chain): not folded")
    if source.root.is_graph_input():
        raise _Blocked(f"constant '{source.root.name}' is also a graph input (overridable)")
    return source.effective_shape()


def _broadcast_edit(node: ir.Node, index: int, ax: ChannelAxis, role: str) -> list[ConstEdit]:
    """Edit for a constant broadcast right-aligned against the permuted tensor."""
    value = node.inputs[index]
    if value is None:
        return []
    shape = effective_shape(value)
    if ax.rank is not None and len(shape) > ax.rank:
        raise _Blocked(f"{node.op_type} '{_name(node)}' broadcasts a constant to a higher rank")
    if len(shape) < -ax.axis or shape[ax.axis] == 1:
        return []  # constant along the channel axis: unchanged
    if shape[ax.axis] != ax.channels:
        raise _Blocked(
            f"{node.op_type} '{_name(node)}' constant has {shape[ax.axis]} entries on the "
            f"channel axis, expected {ax.channels}"
        )
    return [ConstEdit(node, index, len(shape) + ax.axis, role)]


def _is_depthwise(layer: GemmLayer) -> bool:
    return (layer.op_type == "Conv" and layer.group > 1 and layer.in_channels == 1
            and layer.out_features == layer.group)


def classify(
    node: ir.Node, layer: GemmLayer | None, ax: ChannelAxis
) -> tuple[list[int], list[ConstEdit]]:
    """Data inputs (may carry the permuted tensor) and constant edits of a channel-wise op.

    Raises _Blocked with a reason when the op is not channel-equivariant.
    """
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        raise _Blocked(f"custom op {node.domain}::{op} '{_name(node)}'")
    if layer is not None and _is_depthwise(layer):
        if not ax.is_axis1 or layer.weight.quantized:
            raise _Blocked(
                f"depthwise Conv '{_name(node)}' does not read the permuted axis as channels"
            )
        edits = [ConstEdit(node, 1, 0, "per-channel")]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            edits.append(ConstEdit(node, 2, 0, "per-channel"))
        return [0], edits
    if op in _UNARY or op == "LayerNormalization":
        edits = [e for i in range(1, len(node.inputs)) if _const_or_block(node, i)
                 for e in _broadcast_edit(node, i, ax, "per-channel")]
        return [0], edits
    if op in _BINARY:
        data = [i for i, v in enumerate(node.inputs) if not _is_const(v)]
        for i in data:
            if _is_const_expr(node.inputs[i]):
                raise _unfolded(node, node.inputs[i])
        edits = [e for i, v in enumerate(node.inputs) if _is_const(v)
                 for e in _broadcast_edit(node, i, ax, "per-channel")]
        return data, edits
    if op in _CHANNEL_PARAMS:
        if not ax.is_axis1:
            raise _Blocked(f"{op} '{_name(node)}' normalises axis 1, not the permuted axis")
        if node.attributes.get_int("training_mode", 0):
            raise _Blocked(f"{op} '{_name(node)}' is in training mode")
        edits = []
        for i in range(1, len(node.inputs)):
            _const_or_block(node, i)
            if node.inputs[i] is not None and effective_shape(node.inputs[i]) != (ax.channels,):
                raise _Blocked(f"{op} '{_name(node)}' parameter {i} is not per-channel")
            edits.append(ConstEdit(node, i, 0, "per-channel"))
        return [0], edits
    if op in _POOLS:
        if not ax.is_axis1:
            raise _Blocked(f"{op} '{_name(node)}' pools a tensor whose channels are not on axis 1")
        return [0], []
    if op in ("Reshape", "Flatten"):
        raise _Blocked(
            f"{op} '{_name(node)}' splits or merges the channel axis (Reshape into heads / flatten)"
        )
    if op in ("Concat", "Split", "Slice"):
        raise _Blocked(
            f"{op} '{_name(node)}' on the permuted tensor "
            "(Concat/Split/Slice may act on the channel axis)"
        )
    if op in ("Softmax", "LogSoftmax"):
        raise _Blocked(f"{op} '{_name(node)}' over the permuted tensor")
    if op.startswith("Reduce"):
        raise _Blocked(f"{op} '{_name(node)}' reduces the permuted tensor (not folded through)")
    raise _Blocked(f"{op} '{_name(node)}' is not a per-channel op")


def _const_or_block(node: ir.Node, index: int) -> bool:
    if not _is_const(node.inputs[index]):
        if _is_const_expr(node.inputs[index]):
            raise _unfolded(node, node.inputs[index])
        raise _Blocked(f"{node.op_type} '{_name(node)}' has a non-constant parameter input {index}")
    return True


def consumer_axis(layer: GemmLayer) -> tuple[int, int | None]:
    """(axis from the end, rank or None) at which ``layer`` reads input channels."""
    if layer.op_type == "Conv":
        return -(len(layer.kernel) + 1), len(layer.kernel) + 2
    return -1, (2 if layer.op_type == "Gemm" else None)


def _check_gemm(layer: GemmLayer, role: str) -> None:
    if layer.weight.quantized:
        raise _Blocked(f"{role} '{layer.name}' has a quantized weight (DequantizeLinear chain)")
    if any(n.op_type not in ("Transpose", "Cast", "Identity") for n in layer.weight.chain):
        raise _Blocked(f"{role} '{layer.name}' weight chain is not Transpose/Cast/Identity")
    if layer.op_type == "Conv" and layer.group != 1:
        raise _Blocked(f"{role} '{layer.name}' is a grouped Conv (group={layer.group})")
    shape = effective_shape(layer.node.inputs[layer.weight_input])  # also refuses graph inputs
    if layer.layout == "matmul" and len(shape) != 2:
        raise _Blocked(f"{role} '{layer.name}' has a batched weight")


def _consumer_edit(layer: GemmLayer, ax: ChannelAxis) -> ConstEdit:
    _check_gemm(layer, "consumer")
    if layer.op_type == "Gemm" and layer.node.attributes.get_int("transA", 0):
        raise _Blocked(f"consumer '{layer.name}' is a Gemm with transA=1 (channels on axis 0)")
    axis, rank = consumer_axis(layer)
    if axis != ax.axis or (rank is not None and ax.rank is not None and rank != ax.rank):
        raise _Blocked(
            f"consumer '{layer.name}' reads channels on another axis than the producer emits"
        )
    if layer.in_channels != ax.channels:
        raise _Blocked(
            f"consumer '{layer.name}' has {layer.in_channels} input channels, "
            f"expected {ax.channels}"
        )
    return ConstEdit(
        layer.node, layer.weight_input, CONSUMER_WEIGHT_AXIS[layer.layout], "consumer weight"
    )


def _producer_edits(layer: GemmLayer, ax: ChannelAxis) -> list[ConstEdit]:
    _check_gemm(layer, "producer")
    if layer.out_features != ax.channels:
        raise _Blocked(
            f"producer '{layer.name}' has {layer.out_features} outputs, expected {ax.channels}"
        )
    edits = [
        ConstEdit(layer.node, layer.weight_input, _PRODUCER_AXIS[layer.layout], "producer weight")
    ]
    node = layer.node
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None:
        _const_or_block(node, 2)
        if layer.op_type == "Conv":
            edits.append(ConstEdit(node, 2, 0, "producer bias"))
        else:  # Gemm C broadcasts right-aligned against [M, N]
            edits += _broadcast_edit(node, 2, ChannelAxis(-1, 2, ax.channels), "producer bias")
    return edits


def _chain_up(value: ir.Value, layers: dict[ir.Node, GemmLayer], limit: int = 64) -> list[ir.Value]:
    """Values met walking up through channel-wise-looking ops (used to spot GELU-like diamonds)."""
    seen = [value]
    for _ in range(limit):
        node = value.producer()
        if node is None or (node in layers and not _is_depthwise(layers[node])):
            break
        if node.op_type not in _UNARY | _BINARY | _CHANNEL_PARAMS | _POOLS | {"LayerNormalization"}:
            break
        data = [v for v in node.inputs if not _is_const(v)]
        if not data:
            break
        value = data[0]
        seen.append(value)
    return seen


def _find_producer(
    tensor: ir.Value, layers: dict[ir.Node, GemmLayer], ax: ChannelAxis
) -> tuple[ir.Node, bool]:
    """Walk up from ``tensor`` to the GEMM that emits it; also say if a LayerNorm was crossed."""
    value, via_ln = tensor, False

    def block(reason: str) -> _Blocked:
        if not via_ln:
            return _Blocked(reason)
        kind = "is a residual stream" if "residual" in reason else "is blocked"
        return _Blocked(f"LayerNorm input {kind}: {reason}")

    while True:
        if value.is_graph_input():
            raise _Blocked(
                "LayerNorm input is a graph input" if via_ln else "tensor is a graph input"
            )
        if _is_const(value):
            raise block("tensor is a constant")
        node = value.producer()
        assert node is not None
        layer = layers.get(node)
        if layer is not None and not _is_depthwise(layer):
            return node, via_ln
        if node.op_type in ("MatMul", "Gemm", "Conv") and layer is None:
            raise block(f"producer {node.op_type} '{_name(node)}' has no constant weight")
        if node.op_type == "Gather":
            raise block(f"tensor comes from Gather '{_name(node)}' (embedding lookup): not folded")
        try:
            data, _ = classify(node, layer, ax)
        except _Blocked as exc:
            raise block(str(exc)) from None
        inputs = [node.inputs[i] for i in data]
        if not inputs:
            raise block(f"tensor is computed from constants only ({_name(node)})")
        roots = [v for v in inputs if all(v is o or v in _chain_up(o, layers) for o in inputs)]
        if not roots:
            raise block(
                f"residual {node.op_type} '{_name(node)}': its other operand comes from another "
                "branch, which would need the same permutation"
            )
        via_ln = via_ln or node.op_type == "LayerNormalization"
        value = roots[0]


def _producer_axis(layer: GemmLayer, channels: int) -> ChannelAxis:
    axis, rank = consumer_axis(layer)  # a GEMM emits channels where its own kind reads them
    if rank is None:
        shape = layer.node.outputs[0].shape
        rank = len(shape) if shape is not None else None
    return ChannelAxis(axis, rank, channels)


def analyse_region(layer: GemmLayer, layers: list[GemmLayer]) -> Region:
    """Producer, pass-through nodes, sibling consumers and constant edits for ``layer``'s input."""
    by_node = {item.node: item for item in layers}
    tensor = layer.node.inputs[0]
    region = Region(
        consumers=[c for c in layers if c.node.inputs[0] is tensor and not _is_depthwise(c)]
    )
    axis, rank = consumer_axis(layer)
    if rank is None and tensor is not None and tensor.shape is not None:
        rank = len(tensor.shape)
    ax = ChannelAxis(axis, rank, layer.in_channels)
    try:
        if tensor is None:
            raise _Blocked("layer has no activation input")
        _consumer_edit(layer, ax)
        producer, via_ln = _find_producer(tensor, by_node, ax)
        region.producer = producer
        prod_ax = _producer_axis(by_node[producer], ax.channels)
        if prod_ax.axis != ax.axis or (
            None not in (prod_ax.rank, ax.rank) and prod_ax.rank != ax.rank
        ):
            raise _Blocked(
                f"producer '{by_node[producer].name}' emits channels on another axis than "
                f"'{layer.name}' reads them"
            )
        ax = ChannelAxis(ax.axis, ax.rank if ax.rank is not None else prod_ax.rank, ax.channels)
        region.edits = _producer_edits(by_node[producer], ax)
        try:
            _close_forward(producer.outputs[0], by_node, ax, region)
        except _Blocked as exc:
            if via_ln and "residual" in str(exc):
                raise _Blocked(f"LayerNorm input is a residual stream: {exc}") from None
            raise
        if all(c.node is not layer.node for c in region.consumers):
            raise _Blocked("internal: the layer was not reached from its producer")
    except _Blocked as exc:
        region.reason = str(exc)
    return region


def _close_forward(
    start: ir.Value, by_node: dict[ir.Node, GemmLayer], ax: ChannelAxis, region: Region
) -> None:
    """Grow the region from the producer's output; raise _Blocked at the first foreign use."""
    values: set[ir.Value] = {start}
    accepted: set[ir.Node] = set()
    pending: dict[ir.Node, None] = {}
    consumers: dict[ir.Node, GemmLayer] = {}
    work = [start]
    while work:
        value = work.pop()
        if value.is_graph_output():
            raise _Blocked(f"permuted tensor '{value.name}' is a graph output")
        for use in value.uses():
            node = use.node
            if node.graph is not start.graph:
                raise _Blocked(
                    f"permuted tensor '{value.name}' is read inside a subgraph "
                    f"({node.op_type} '{_name(node)}' in an If/Loop/Scan body)"
                )
            if node in accepted or node in consumers or node.op_type in _INVARIANT:
                continue
            layer = by_node.get(node)
            if layer is not None and not _is_depthwise(layer):
                if use.idx != 0:
                    raise _Blocked(f"permuted tensor feeds input {use.idx} of '{layer.name}'")
                region.edits.append(_consumer_edit(layer, ax))
                consumers[node] = layer
                continue
            try:
                data, edits = classify(node, layer, ax)
            except _Blocked as exc:
                reason = f"producer output used elsewhere (fan-out to non-GEMM): {exc}"
                raise _Blocked(reason) from None
            if use.idx not in data:
                raise _Blocked(
                    f"permuted tensor is a parameter (input {use.idx}) of "
                    f"{node.op_type} '{_name(node)}'"
                )
            if not all(node.inputs[i] in values for i in data):
                pending[node] = None
                continue
            accepted.add(node)
            pending.pop(node, None)
            region.through.append(node)
            region.edits += edits
            for i, out in enumerate(node.outputs):
                if i > 0 and out.uses() and node.op_type not in _EXTRA_OUTPUTS_OK:
                    raise _Blocked(f"output {i} of {node.op_type} '{_name(node)}' is used")
                if i == 0 or node.op_type in _EXTRA_OUTPUTS_OK:
                    values.add(out)
                    work.append(out)
    for node in pending:
        kind = "residual Add" if node.op_type == "Add" else node.op_type
        raise _Blocked(
            f"{kind} '{_name(node)}': the other operand is not in the fold and would "
            "need the same permutation"
        )
    region.consumers = list(consumers.values())
