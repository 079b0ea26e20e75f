"""ConvertToFloat16Pass: run a float32 model in float16, keeping the fragile ops in float32.

Why: TensorRT 10+ builds *strongly typed* networks — the ONNX dtypes decide each layer's
precision, and sparse tensor-core tactics exist only for FP16/BF16/INT8 GEMMs. A 2:4 weight
stored as FP32 therefore runs dense. This pass stores GEMM/Conv weights (and the rest of the
float computation) as FP16, and keeps normalisations, softmax and the exp/log/pow family in
FP32 behind Cast nodes, where FP16 range and rounding hurt accuracy most.

How: every node is given a *mode* — FP16 (ops on an allow-list whose float inputs and outputs
share one type parameter, so converting them together is type-correct) or FP32 (the keep list,
anything unknown, custom domains, nodes touching values of unknown type). Initializers,
Constant / ConstantOfShape / Cast(to=float) follow their consumers. Casts are inserted only
where a value's new dtype differs from what its consumer needs, one Cast per (value, dtype).
Elementwise nodes sandwiched between FP32 nodes stay FP32 (no Cast ping-pong inside a
decomposed LayerNorm). Zeros stay exactly zero (FP16 has a signed zero), so 2:4 patterns survive.

Control flow (If/Loop/Scan): the node and its bodies stay FP32, the top-level graph around them
is converted. A body reads outer values by name, not through the node's inputs, so every outer
value a body reads is planned as an FP32 input of that body: it keeps FP32 when only bodies
read it, or the body reads an FP32 Cast of it inserted before the control-flow node. Layers
inside bodies therefore stay FP32 (and dense in a strongly typed TensorRT build); the summary
counts the nodes so the compile can say so.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from mpcompile.passes._names import UniqueNamer
from mpcompile.passes.gemm_discovery import node_subgraphs

__all__ = ["ConvertToFloat16Pass", "Fp16Summary", "DEFAULT_KEEP_FP32_OPS", "FP16_MAX"]

logger = logging.getLogger(__name__)

FLOAT, FLOAT16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)

DEFAULT_KEEP_FP32_OPS: tuple[str, ...] = (
    "LayerNormalization", "GroupNormalization", "InstanceNormalization", "RMSNormalization",
    "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2",
    "ReduceLogSumExp", "Pow", "Sqrt", "Exp", "Log",
)

# Ops whose float inputs and outputs share one type parameter: converting all together is valid.
_FP16_OPS = frozenset("""
    Abs Acos Acosh Add Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Clip Concat
    Conv ConvTranspose Cos Cosh DepthToSpace Div Dropout Einsum Elu Equal Erf Exp Expand Flatten
    Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalMaxPool Greater
    GreaterOrEqual GroupNormalization HardSigmoid HardSwish Identity InstanceNormalization
    LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax MatMul Max MaxPool Mean Min Mish
    Mul Neg Pad Pow PRelu Reciprocal ReduceL1 ReduceL2 ReduceLogSumExp ReduceMax ReduceMean
    ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize Round ScatterElements
    ScatterND Selu Shape Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth
    Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile Transpose Trilu Unsqueeze Where
    CastLike
""".split())
# Inputs that accept any dtype (never cast) and inputs whose dtype is fixed by the op schema.
_ANY_INPUTS = {"Shape": {0}, "Size": {0}, "CastLike": {0}, "Cast": {0}}
_ORIGINAL_INPUTS = {"Resize": {1, 2}, "Dropout": {1}}
# Outputs that keep their dtype in an FP16 node (LayerNormalization's Mean/InvStdDev: stash_type).
_FIXED_OUTPUTS = {"LayerNormalization": {1, 2}}
# Elementwise ops that may stay FP32 when sandwiched between FP32 nodes.
_SANDWICH_OPS = frozenset("Add Sub Mul Div Neg Abs Reciprocal Max Min Clip Identity".split())
_FOLLOWERS = frozenset({"Constant", "ConstantOfShape", "Cast"})
_STANDARD_DOMAINS = ("", "ai.onnx")


@dataclass
class Fp16Summary:
    """What a run changed, for logs and reports.

    Attributes:
        initializers: float32 initializers stored as float16.
        constants: Constant / ConstantOfShape nodes converted.
        casts: Cast nodes inserted.
        fp32_nodes: op type → count of nodes left in float32 (kept, unknown or sandwiched).
        overflowed: constant entries clipped to ±65504.
        underflowed: nonzero constant entries that became zero in float16.
        control_flow_nodes: If/Loop/Scan nodes whose bodies were left in float32.
    """

    initializers: int = 0
    constants: int = 0
    casts: int = 0
    fp32_nodes: Counter = field(default_factory=Counter)
    overflowed: int = 0
    underflowed: int = 0
    control_flow_nodes: int = 0


class ConvertToFloat16Pass(ir.passes.InPlacePass):
    """Convert the float32 computation of the top-level graph to float16.

    Attributes:
        keep_fp32_ops: op types that run in float32 (Cast to float32 before, back after).
        keep_io_types: keep float32 graph inputs/outputs (Casts at the boundary); False makes
            them float16.
        summary: filled by each run.
    """

    def __init__(self, keep_fp32_ops: Iterable[str] = DEFAULT_KEEP_FP32_OPS,
                 keep_io_types: bool = True) -> None:
        super().__init__()
        self.keep_fp32_ops = frozenset(keep_fp32_ops)
        self.keep_io_types = keep_io_types
        self.summary = Fp16Summary()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        if _has_untyped_values(graph):
            ShapeInferencePass(strict_mode=False)(model)
        self.summary = Fp16Summary()
        plan = _Plan(graph, self.keep_fp32_ops, self.keep_io_types)
        modified = _apply(graph, plan, self.summary)
        s = self.summary
        logger.info(
            "fp16: %d initializers, %d constants converted, %d casts inserted, fp32 nodes: %s",
            s.initializers, s.constants, s.casts, dict(s.fp32_nodes),
        )
        if s.overflowed:
            logger.warning("fp16: %d constant entries exceeded ±%g and were clipped",
                           s.overflowed, FP16_MAX)
        return ir.passes.PassResult(model, modified=modified)


def _has_untyped_values(graph: ir.Graph) -> bool:
    return any(v.dtype is None for node in graph for v in node.outputs if v.name or v.uses())


class _Plan:
    """Per-node modes and per-value target dtypes, decided before the graph is touched."""

    def __init__(self, graph: ir.Graph, keep: frozenset[str], keep_io: bool) -> None:
        self.graph = graph
        self.keep_io = keep_io
        self.fp16: dict[ir.Node, bool] = {}
        self.reason: dict[ir.Node, str] = {}
        for node in graph:
            if not _is_follower(node):
                self.fp16[node] = self._decide(node, keep)
        self._unsandwich()
        for node in graph:  # followers after the others: they look at their consumers
            if _is_follower(node):
                uses = node.outputs[0].uses()
                self.fp16[node] = any(self.needs(u.node, u.idx) == FLOAT16 for u in uses)

    def _decide(self, node: ir.Node, keep: frozenset[str]) -> bool:
        op = node.op_type
        if node.domain not in _STANDARD_DOMAINS or op not in _FP16_OPS:
            self.reason[node] = "no FP16 rule"
            return False
        if op in keep:
            self.reason[node] = "kept"
            return False
        values = [v for v in (*node.inputs, *node.outputs) if v is not None]
        if any(v.dtype is None for v in values):
            self.reason[node] = "value of unknown type"
            return False
        if any(v.dtype.is_floating_point() and v.dtype not in (FLOAT, FLOAT16) for v in values):
            self.reason[node] = "other float type"
            return False
        return True

    def _unsandwich(self) -> None:
        """Keep FP32 the elementwise nodes fed by FP32 and feeding only FP32 consumers."""
        changed = True
        while changed:
            changed = False
            for node, fp16 in self.fp16.items():
                if not fp16 or node.op_type not in _SANDWICH_OPS:
                    continue
                floats = [v for v in node.inputs if v is not None and v.dtype == FLOAT]
                if floats and all(self._fp32_source(v) for v in floats) and all(
                    self.needs(use.node, use.idx) != FLOAT16
                    for out in node.outputs for use in out.uses()
                ) and not any(out.is_graph_output() and not self.keep_io for out in node.outputs):
                    self.fp16[node], self.reason[node] = False, "between FP32 nodes"
                    changed = True

    def _fp32_source(self, value: ir.Value) -> bool:
        producer = value.producer()
        if producer is None:
            return value.is_initializer() or self.keep_io
        return _is_follower(producer) or not self.fp16.get(producer, False)

    def needs(self, node: ir.Node, index: int) -> ir.DataType | None:
        """The dtype ``node`` needs at input ``index``, if its original dtype was float32."""
        value = node.inputs[index]
        if value is None or value.dtype != FLOAT:
            return None
        op = node.op_type
        if index in _ANY_INPUTS.get(op, ()) and node.domain in _STANDARD_DOMAINS:
            return None
        if not self.fp16.get(node, False) or index in _ORIGINAL_INPUTS.get(op, ()):
            return FLOAT
        return FLOAT16

    def target(self, value: ir.Value) -> ir.DataType | None:
        """The dtype ``value`` will have after the pass (None: unchanged)."""
        if value.dtype != FLOAT:
            return None
        producer = value.producer()
        if producer is None:
            if value.is_graph_input() or value.is_graph_output():  # stays an I/O tensor
                return FLOAT if self.keep_io else FLOAT16
            uses = value.uses()
            return FLOAT16 if any(self.needs(u.node, u.idx) == FLOAT16 for u in uses) else FLOAT
        if not self.fp16.get(producer, False):
            return FLOAT
        if value.index() in _FIXED_OUTPUTS.get(producer.op_type, ()):
            return FLOAT
        return FLOAT16


def _is_follower(node: ir.Node) -> bool:
    if node.domain not in _STANDARD_DOMAINS or node.op_type not in _FOLLOWERS:
        return False
    return len(node.outputs) == 1 and node.outputs[0].dtype == FLOAT


def _outer_reads(graph: ir.Graph) -> list[tuple[ir.Node, ir.Node, int]]:
    """(top-level control-flow node, body node, input index) for each body input that is a
    value of ``graph`` itself: what the bodies read from the converted scope."""
    reads = []
    for top in graph:
        for _, body in node_subgraphs(top):
            for inner in ir.traversal.RecursiveGraphIterator(body):
                for index, value in enumerate(inner.inputs):
                    if value is not None and value.graph is graph:
                        reads.append((top, inner, index))
    return reads


def _apply(graph: ir.Graph, plan: _Plan, summary: Fp16Summary) -> bool:
    nodes = list(graph)
    # everything is decided on the original dtypes, before the first mutation
    needs = [(node, index, need, node) for node in nodes for index in range(len(node.inputs))
             if (need := plan.needs(node, index)) is not None]
    # bodies stay FP32: what they read from this scope is an FP32 input, cast before their node
    needs += [(inner, index, FLOAT, top) for top, inner, index in _outer_reads(graph)
              if inner.inputs[index].dtype == FLOAT]
    summary.control_flow_nodes = sum(1 for node in nodes if node_subgraphs(node))
    float_outputs = [v.dtype == FLOAT for v in graph.outputs]
    targets = {}
    for value in (*graph.inputs, *graph.initializers.values()):
        targets[value] = plan.target(value)
    for node in nodes:
        for out in node.outputs:
            targets[out] = plan.target(out)
        if node.op_type not in _FOLLOWERS and not plan.fp16.get(node, True) and any(
            v is not None and v.dtype == FLOAT for v in (*node.inputs, *node.outputs)
        ):
            summary.fp32_nodes[node.op_type] += 1

    # 1. rewrite stored data and attributes, then value types
    for value, dtype in targets.items():
        if dtype != FLOAT16:
            continue
        if value.const_value is not None:
            value.const_value = _to_fp16_tensor(value.const_value, value.name, summary)
            summary.initializers += int(value.is_initializer())
        producer = value.producer()
        if producer is not None and _is_follower(producer):
            _convert_follower(producer, summary)
        value.type = ir.TensorType(FLOAT16)

    # 2. casts where a consumer needs another dtype than its input now has
    namer = UniqueNamer(graph)
    casts: dict[tuple[ir.Value, ir.DataType], ir.Value] = {}
    for node, index, need, anchor in needs:
        value = node.inputs[index]
        assert value is not None
        if value.dtype == need:
            continue
        key = (value, need)
        if key not in casts:
            casts[key] = _cast(value, need, namer)
            graph.insert_before(anchor, casts[key].producer())
            summary.casts += 1
        elif anchor is not node and _position(graph, casts[key].producer()) > _position(graph, anchor):
            graph.remove(casts[key].producer())  # made for a later node: move it before this one
            graph.insert_before(anchor, casts[key].producer())
        node.replace_input_with(index, casts[key])

    # 3. graph boundary: float32 outputs when keep_io_types (float16 otherwise)
    want = FLOAT if plan.keep_io else FLOAT16
    for i, (value, was_float) in enumerate(zip(list(graph.outputs), float_outputs)):
        if not was_float or value.dtype == want or value.is_graph_input() or value.is_initializer():
            continue
        name = value.name
        value.name = namer(f"{name}_{value.dtype.name.lower()}")
        cast = _cast(value, want, namer)
        namer.used.discard(cast.name)
        cast.name = name
        graph.append(cast.producer())
        graph.outputs[i] = cast
        summary.casts += 1
    return bool(summary.initializers or summary.constants or summary.casts
                or any(t == FLOAT16 for t in targets.values()))


def _position(graph: ir.Graph, node: ir.Node) -> int:
    return next(i for i, item in enumerate(graph) if item is node)


def _convert_follower(node: ir.Node, summary: Fp16Summary) -> None:
    if node.op_type == "Cast":
        node.attributes["to"] = ir.AttrInt64("to", FLOAT16.value)
        return
    if node.op_type == "ConstantOfShape":
        attr = node.attributes.get("value")
        tensor = attr.as_tensor() if attr is not None else ir.tensor(np.zeros(1, np.float32))
        node.attributes["value"] = ir.AttrTensor("value", _to_fp16_tensor(tensor, "value", summary))
        summary.constants += 1
        return
    # Constant: value / value_float / value_floats all become a float16 `value` tensor
    attrs = node.attributes
    if "value" in attrs:
        tensor = attrs["value"].as_tensor()
    elif "value_float" in attrs:
        tensor = ir.tensor(np.asarray(attrs.pop("value_float").as_float(), np.float32))
    else:
        tensor = ir.tensor(np.asarray(attrs.pop("value_floats").as_floats(), np.float32))
    attrs["value"] = ir.AttrTensor("value", _to_fp16_tensor(tensor, node.outputs[0].name, summary))
    summary.constants += 1


def _to_fp16_tensor(tensor: ir.TensorProtocol, name: str | None, summary: Fp16Summary) -> ir.Tensor:
    """float32 → float16, clipping finite values to ±65504; zeros (and their sign) stay exact."""
    array = np.asarray(tensor.numpy(), dtype=np.float32)
    finite = np.isfinite(array)
    big = finite & (np.abs(array) > FP16_MAX)
    summary.overflowed += int(np.count_nonzero(big))
    half = np.where(big, np.sign(array) * FP16_MAX, array).astype(np.float16)
    summary.underflowed += int(np.count_nonzero((half == 0) & (array != 0)))
    return ir.tensor(half, name=name or tensor.name)


def _cast(value: ir.Value, dtype: ir.DataType, namer: UniqueNamer) -> ir.Value:
    base = value.name or "value"
    suffix = dtype.name.lower()
    node = ir.node("Cast", [value], {"to": dtype.value}, name=namer(f"{base}/Cast_{suffix}"))
    out = node.outputs[0]
    out.name = namer(f"{base}_{suffix}")
    out.type = ir.TensorType(dtype)
    out.shape = value.shape
    return out
