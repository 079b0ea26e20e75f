"""LowerConvToIm2colPass: rewrite 2-D convolutions as an explicit unfold + MatMul.

Why: TensorRT accepts 2:4 weights on convolutions only in one layout (groups of 4 input
channels at one kernel position), and some deployments want the conv as a plain GEMM (to
share a MatMul kernel path, to reuse a MatMul-only sparse tactic, or to prune along the
im2col reduction the papers describe). This pass makes that GEMM explicit in the graph, with
the reduction ordered ``(kh, kw, Cin)``, Cin fastest (DESIGN §3), so a weight that is 2:4 in
TensorRT conv order stays 2:4 — now down axis 0 of the MatMul weight, which is where
TensorRT's MatMul rule looks.

The unfold uses only Pad, Slice, Concat, Transpose and Reshape (all supported by TensorRT and
ONNX Runtime, all exact): one strided Slice of the padded input per kernel position, concatenated
on the channel axis in (kh, kw) order. Slice ends are written relative to the padded size so the
batch (and, when the output shape is rebuilt with Shape ops, the spatial size) may stay dynamic.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from mpcompile.passes._names import UniqueNamer
from mpcompile.numerics.im2col import conv_output_size
from mpcompile.passes.gemm_discovery import GemmLayer, discover_gemms, display_names

__all__ = ["LowerConvToIm2colPass", "LoweredConv"]

logger = logging.getLogger(__name__)

_INT64_MAX = np.iinfo(np.int64).max
_MIN_OPSET = 11  # Pad and Slice take their parameters as inputs from opset 11 on


@dataclass
class LoweredConv:
    """One rewritten conv, for reports.

    Attributes:
        name: display name of the original Conv node.
        matmul: the new MatMul node.
        weight: the new ``[kh·kw·Cin, Cout]`` initializer.
    """

    name: str
    matmul: ir.Node
    weight: ir.Value


@dataclass
class _Geometry:
    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]  # ONNX order: top, left, bottom, right
    spatial: tuple[int, int] | None  # (H, W) of the input when static


@dataclass
class _Builder:
    """Collects the new nodes and constants of one lowering, all named under ``prefix``."""

    graph: ir.Graph  # the top-level graph: it holds the new constants, which bodies read by name
    namer: UniqueNamer
    prefix: str
    nodes: list[ir.Node] = field(default_factory=list)

    def const(self, suffix: str, array: np.ndarray) -> ir.Value:
        tensor = ir.tensor(np.ascontiguousarray(array), name=self.namer(f"{self.prefix}/{suffix}"))
        value = ir.Value(name=tensor.name, shape=ir.Shape(array.shape),
                         type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def ints(self, suffix: str, values: list[int]) -> ir.Value:
        return self.const(suffix, np.asarray(values, dtype=np.int64))

    def op(self, op_type: str, inputs: list[ir.Value | None], attributes: dict | None = None,
           *, suffix: str | None = None, metadata: dict[str, str] | None = None) -> ir.Value:
        label = suffix or op_type
        node = ir.node(op_type, inputs, attributes, name=f"{self.prefix}/{label}",
                       metadata_props=metadata)
        node.outputs[0].name = self.namer(f"{self.prefix}/{label}_out")
        self.nodes.append(node)
        return node.outputs[0]


class LowerConvToIm2colPass(ir.passes.InPlacePass):
    """Replace 2-D, group-1 Convs by Pad → Slices → Concat → Transpose → Reshape → MatMul.

    Skipped (logged, and listed in ``skipped``): grouped/depthwise convs, non-2-D convs, convs
    whose weight is not a constant (or is quantized), ``auto_pad=SAME_*`` with a dynamic
    spatial size, and models below opset 11.

    Attributes:
        nodes: the Conv nodes to lower (inside If/Loop/Scan bodies too); None lowers every
            eligible Conv of the top-level graph.
        lowered: filled by each run: what was rewritten.
        skipped: filled by each run: ``(node name, reason)`` for each Conv left alone.
    """

    def __init__(self, nodes: list[ir.Node] | None = None) -> None:
        super().__init__()
        self.nodes = nodes
        self.lowered: list[LoweredConv] = []
        self.skipped: list[tuple[str, str]] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.lowered, self.skipped = [], []
        names = display_names(graph)
        layers = {layer.node: layer for layer in discover_gemms(model) if layer.op_type == "Conv"}
        if self.nodes is None:
            targets = [n for n in graph if n.op_type == "Conv" and n.domain in ("", "ai.onnx")]
        else:
            targets = list(self.nodes)
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        namer = UniqueNamer(graph)
        for node in targets:
            name = names.get(node, node.name or "Conv")
            reason = _refusal(node, layers.get(node), graph, opset)
            geometry = None
            if not reason:
                geometry, reason = _geometry(node, layers[node])
            if reason:
                logger.info("im2col: %s left as Conv: %s", name, reason)
                self.skipped.append((name, reason))
                continue
            assert geometry is not None
            self.lowered.append(_lower(graph, node, name, layers[node], geometry, namer))
            logger.debug("im2col: lowered %s", name)
        logger.info("im2col: lowered %d conv(s), skipped %d", len(self.lowered), len(self.skipped))
        return ir.passes.PassResult(model, modified=bool(self.lowered))


def _refusal(node: ir.Node, layer: GemmLayer | None, graph: ir.Graph, opset: int) -> str:
    """Why ``node`` cannot be lowered, or '' if it can."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
        return f"not an ONNX Conv ({node.domain or 'ai.onnx'}::{node.op_type})"
    if opset < _MIN_OPSET:
        return f"opset {opset} < {_MIN_OPSET}"
    if layer is None:
        return "weight is not a constant"
    if layer.weight.quantized:
        return "quantized weight (DequantizeLinear): lowering would dequantize it"
    if len(layer.kernel) != 2:
        return f"{len(layer.kernel)}-D conv; only 2-D convs are lowered"
    if layer.group != 1:
        return f"grouped conv (group={layer.group}): im2col needs one GEMM per group"
    x = node.inputs[0]
    if x is not None and x.shape is not None and len(x.shape) != 4:
        return f"input of rank {len(x.shape)}, expected NCHW"
    return ""


def _geometry(node: ir.Node, layer: GemmLayer) -> tuple[_Geometry | None, str]:
    attrs = node.attributes
    kernel = tuple(layer.kernel)
    strides = tuple(attrs.get_ints("strides", None) or (1, 1))
    dilations = tuple(attrs.get_ints("dilations", None) or (1, 1))
    pads = tuple(attrs.get_ints("pads", None) or (0, 0, 0, 0))
    auto_pad = attrs.get_string("auto_pad", "NOTSET")
    x = node.inputs[0]
    spatial = None
    if x is not None and x.shape is not None and all(isinstance(d, int) for d in x.shape[2:]):
        spatial = (int(x.shape[2]), int(x.shape[3]))
    if min(strides) < 1 or min(dilations) < 1 or min(pads) < 0:
        return None, f"invalid geometry strides={strides} dilations={dilations} pads={pads}"
    if auto_pad == "VALID":
        pads = (0, 0, 0, 0)
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if spatial is None:
            return None, f"auto_pad={auto_pad} with a dynamic spatial size"
        pads = _same_pads(spatial, kernel, strides, dilations, upper=auto_pad == "SAME_UPPER")
    elif auto_pad != "NOTSET":
        return None, f"unknown auto_pad {auto_pad!r}"
    return _Geometry(kernel, strides, dilations, pads, spatial), ""


def _same_pads(spatial, kernel, strides, dilations, *, upper: bool) -> tuple[int, int, int, int]:
    """ONNX SAME_* padding: output = ceil(input / stride); the odd pixel goes last (UPPER)."""
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begin.append(small if upper else big)
        end.append(big if upper else small)
    return (begin[0], begin[1], end[0], end[1])


def _lower(graph: ir.Graph, node: ir.Node, name: str, layer: GemmLayer, geo: _Geometry,
           namer: UniqueNamer) -> LoweredConv:
    x, weight_in = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    assert x is not None and weight_in is not None
    b = _Builder(graph, namer, namer(f"{name}/im2col"))
    kh, kw = geo.kernel
    sh, sw = geo.strides
    dh, dw = geo.dilations
    top, left, bottom, right = geo.pads
    cout, k = layer.out_features, layer.reduction

    padded = x
    if any(geo.pads):
        padded = b.op("Pad", [x, b.ints("pads", [0, 0, top, left, 0, 0, bottom, right])])
    trivial = (kh, kw, sh, sw) == (1, 1, 1, 1)
    if trivial:
        columns = padded  # 1×1, stride 1: the input already is the column matrix
    else:
        axes, steps = b.ints("axes", [2, 3]), b.ints("steps", [sh, sw])
        slices = []
        for i in range(kh):
            for j in range(kw):
                # ends relative to the padded size keep H/W dynamic:
                # OH = ceil((Hp - (kh-1)·dh) / sh) elements starting at i·dh
                end_h = -(kh - 1 - i) * dh or _INT64_MAX
                end_w = -(kw - 1 - j) * dw or _INT64_MAX
                slices.append(b.op("Slice", [padded, b.ints(f"starts_{i}_{j}", [i * dh, j * dw]),
                                             b.ints(f"ends_{i}_{j}", [end_h, end_w]), axes, steps],
                                   suffix=f"Slice_{i}_{j}"))
        # channel index (i·kw + j)·Cin + c: Cin fastest, as TensorRT groups the reduction
        columns = slices[0] if len(slices) == 1 else b.op("Concat", slices, {"axis": 1})
    nhwk = b.op("Transpose", [columns], {"perm": [0, 2, 3, 1]})
    rows = b.op("Reshape", [nhwk, b.ints("rows_shape", [0, -1, k])])

    dtype = weight_in.dtype or layer.weight.stored_dtype
    matrix = layer.matrix().T.astype(dtype.numpy())  # [K, Cout]: groups of 4 down axis 0
    w_value = b.const("weight", matrix)
    product = b.op("MatMul", [rows, w_value], metadata=dict(node.metadata_props))
    matmul = b.nodes[-1]
    matmul.metadata_props["mpcompile.lowered_from"] = f"Conv:{name}"
    if bias is not None:
        product = b.op("Add", [product, bias])

    if geo.spatial is not None:
        oh = conv_output_size(geo.spatial[0], kh, sh, top, bottom, dh)
        ow = conv_output_size(geo.spatial[1], kw, sw, left, right, dw)
        out_shape = b.ints("out_shape", [0, oh, ow, cout])
    else:  # dynamic H/W: read (N, OH, OW) off the unfolded tensor
        shape = b.op("Shape", [nhwk])
        nhw = b.op("Slice", [shape, b.ints("nhw_start", [0]), b.ints("nhw_end", [3])],
                   suffix="Slice_shape")
        out_shape = b.op("Concat", [nhw, b.ints("cout", [cout])], {"axis": 0},
                         suffix="Concat_shape")
    nhwc = b.op("Reshape", [product, out_shape], suffix="Reshape_out")
    b.op("Transpose", [nhwc], {"perm": [0, 3, 1, 2]}, suffix="Transpose_out")

    old_out = node.outputs[0]
    new_out = b.nodes[-1].outputs[0]
    namer.used.discard(new_out.name)  # the conv's output name moves over to the new value
    # A conv inside an If/Loop/Scan body is replaced in its body; its weight (an outer-scope
    # initializer or a body Constant) is dropped from wherever it lives once nothing reads it.
    body = node.graph or graph
    ir.convenience.replace_nodes_and_values(body, node, [node], b.nodes, [old_out], [new_out])
    _drop_if_unused(weight_in.graph or body, weight_in)
    return LoweredConv(name, matmul, w_value)


def _drop_if_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    """Remove the old weight (and its Transpose/Cast chain) once nothing reads it."""
    while value is not None and not value.uses() and not value.is_graph_output():
        if value.is_initializer():
            if value.name in graph.initializers and not value.is_graph_input():
                del graph.initializers[value.name]
            return
        producer = value.producer()
        if producer is None or producer.graph is not graph or len(producer.outputs) != 1:
            return
        source = producer.inputs[0] if producer.inputs else None
        graph.remove(producer, safe=True)
        value = source
