"""Static shapes for MAC counting: ONNX shape inference on a weight-free skeleton.

Why a skeleton: shape inference only needs the *shapes* of large initializers, but
``onnx.shape_inference`` serialises the whole proto, which would double peak memory on a
multi-GB model. Large initializers are turned into typed graph inputs instead; small ones
(shape tensors for Reshape, axes, …) stay, so data propagation still works.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import onnx
from onnx import shape_inference

from mpcompile.errors import UsageError

__all__ = ["ShapeSpec", "parse_shape_args", "infer_static_shapes", "weightless_copy", "DEFAULT_DYNAMIC_DIM"]

logger = logging.getLogger(__name__)

DEFAULT_DYNAMIC_DIM = 1
_SMALL_INITIALIZER = 64  # elements; bigger ones only contribute their shape


@dataclass
class ShapeSpec:
    """How to make a model's inputs static.

    Attributes:
        inputs: explicit shapes by graph-input name (``--shape name:1x3x224x224``).
        dims: values for named symbolic dimensions (``--dim batch=8``).
        default: the value of any other unknown dimension.
    """

    inputs: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dims: dict[str, int] = field(default_factory=dict)
    default: int = DEFAULT_DYNAMIC_DIM
    # Filled by infer_static_shapes: the symbolic dims that got ``default`` ("?" for unnamed
    # ones), so the statement names them ("N=1 (default)") instead of a vague "other dims".
    defaulted: list[str] = field(default_factory=list, compare=False)
    inferred: bool = field(default=False, compare=False)

    def describe(self) -> str:
        """The shapes every figure is at, in one phrase (the same in console, JSON, HTML)."""
        parts = [f"{k}:{'x'.join(map(str, v))}" for k, v in self.inputs.items()]
        parts += [f"{k}={v}" for k, v in self.dims.items()]
        if not self.inferred:
            parts.append(f"other dynamic dims={self.default}")
        else:
            named = [d for d in dict.fromkeys(self.defaulted) if d != "?"]
            parts += [f"{d}={self.default} (default)" for d in named]
            if "?" in self.defaulted:
                parts.append(f"unnamed dynamic dims={self.default} (default)")
        return ", ".join(parts) or "static input shapes"


_SHAPE_RE = re.compile(r"^([^:]+):(\d+(?:[x,]\d+)*)$")


def expand_dim_sets(dims: list[str] | None) -> list[list[str]]:
    """``--dim batch=1,8,32 --dim seq=128`` → one single-valued ``--dim`` list per combination.

    Why: a speedup depends on M (batch × tokens), so a report can cover several sizes; each
    combination is one shape set (the first is the one MACs and calibration use).
    """
    import itertools

    choices = []
    for text in dims or []:
        name, sep, values = text.partition("=")
        parts = [v.strip() for v in values.split(",")] if sep else [""]
        if not sep or not all(p.isdigit() for p in parts):
            raise UsageError(f"--dim '{text}': expected NAME=INT or NAME=INT,INT,... (e.g. batch=1,8,32)")
        choices.append([f"{name.strip()}={p}" for p in dict.fromkeys(parts)])
    return [list(combo) for combo in itertools.product(*choices)] if choices else [[]]


def parse_shape_args(shapes: list[str] | None, dims: list[str] | None, default: int) -> ShapeSpec:
    """Parse ``name:1x3x224x224`` and ``dim=8`` strings into a ShapeSpec (UsageError if bad)."""
    spec = ShapeSpec(default=default)
    for text in shapes or []:
        match = _SHAPE_RE.match(text.strip())
        if not match:
            raise UsageError(f"--shape '{text}': expected NAME:D1xD2x... (e.g. input:1x3x224x224)")
        spec.inputs[match.group(1)] = tuple(int(d) for d in re.split(r"[x,]", match.group(2)))
    for text in dims or []:
        name, sep, value = text.partition("=")
        if not sep or not value.strip().isdigit():
            raise UsageError(f"--dim '{text}': expected NAME=INT (e.g. batch=8)")
        spec.dims[name.strip()] = int(value)
    return spec


def _set_static(value_info: onnx.ValueInfoProto, spec: ShapeSpec) -> None:
    tensor_type = value_info.type.tensor_type
    if value_info.name in spec.inputs:
        wanted = spec.inputs[value_info.name]
        have = len(tensor_type.shape.dim)
        if have and have != len(wanted):
            raise UsageError(
                f"--shape {value_info.name}: model input has rank {have}, got {len(wanted)} dims"
            )
        del tensor_type.shape.dim[:]
        for d in wanted:
            tensor_type.shape.dim.add().dim_value = d
        return
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value > 0:
            continue
        if dim.dim_param not in spec.dims:
            spec.defaulted.append(dim.dim_param or "?")
        dim.dim_value = spec.dims.get(dim.dim_param, spec.default)


def infer_static_shapes(proto: onnx.ModelProto, spec: ShapeSpec) -> dict[str, tuple[int, ...]]:
    """Shapes of every value ONNX can infer with the inputs made static (name → dims)."""
    graph = proto.graph
    known_inputs = {i.name for i in graph.input}
    unknown = set(spec.inputs) - known_inputs
    if unknown:
        raise UsageError(
            f"--shape names unknown input(s) {sorted(unknown)}; model inputs are {sorted(known_inputs)}"
        )
    skeleton = weightless_copy(proto)
    initializer_names = {t.name for t in graph.initializer}
    spec.defaulted.clear()
    spec.inferred = True
    for vi in skeleton.graph.input:
        if vi.name in known_inputs and vi.name not in initializer_names:
            _set_static(vi, spec)
    try:
        inferred = shape_inference.infer_shapes(skeleton, data_prop=True)
    except Exception as exc:  # inference is best effort: MACs become unknown, nothing breaks
        logger.warning("shape inference failed (%s); MACs will be unknown", str(exc).splitlines()[0])
        return {}
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in _value_infos(inferred.graph):
        tensor_type = vi.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
        shapes[vi.name] = dims
    return shapes


def _value_infos(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Typed values of ``graph`` and, recursively, of its If/Loop/Scan bodies (shape inference
    fills their ``value_info`` too), so layers inside subgraphs get MACs. Value names are
    unique across scopes in valid ONNX; an outer-scope entry is kept over a body's."""
    infos = [*graph.value_info, *graph.output, *graph.input]
    for node in graph.node:
        for attr in node.attribute:
            bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for body in bodies:
                infos = [*_value_infos(body), *infos]
    return infos


def weightless_copy(proto: onnx.ModelProto, max_elements: int = _SMALL_INITIALIZER) -> onnx.ModelProto:
    """The model with every large initializer turned into a typed graph input.

    Valid ONNX that shape inference and the checker accept, at a few kB instead of the
    model's size: neither needs the weights' values, only their shapes.
    """
    graph = proto.graph
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(_without_graph(proto))
    g = skeleton.graph
    g.name = graph.name
    g.node.extend(graph.node)
    g.output.extend(graph.output)
    g.value_info.extend(graph.value_info)
    initializer_names = {t.name for t in graph.initializer}
    g.input.extend(inp for inp in graph.input if inp.name not in initializer_names)
    for tensor in graph.initializer:
        size = 1
        for d in tensor.dims:
            size *= d
        if size <= max_elements and not onnx.external_data_helper.uses_external_data(tensor):
            g.initializer.append(tensor)
        else:
            g.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return skeleton


def _without_graph(proto: onnx.ModelProto) -> onnx.ModelProto:
    shell = onnx.ModelProto()
    shell.ir_version = proto.ir_version
    shell.opset_import.extend(proto.opset_import)
    shell.functions.extend(proto.functions)
    shell.producer_name = proto.producer_name
    return shell
