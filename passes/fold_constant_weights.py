"""Fold ``Reshape``/``Flatten`` of constants that feed a GEMM/Conv weight into initializers.

Why: Paddle- and TF-converted graphs (``const_fold_opt__…`` names) often store a weight in
another layout and reshape it at run time. The result is still a constant, but discovery
follows only value-preserving ops (Identity, Cast, Transpose), whose layout map it knows, so
such GEMMs were silently not found. A reshape of a constant is exact in numpy, so folding it
(the only change to the graph) makes them ordinary layers that every stage handles.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from mpcompile.passes.gemm_discovery import _const_array as _constant  # discovery's reading of a constant

__all__ = ["fold_constant_weight_reshapes"]

_FOLDABLE = frozenset({"Reshape", "Flatten"})
_GEMM_OPS = frozenset({"MatMul", "Gemm", "Conv"})
_PASS_THROUGH = frozenset({"Identity", "Cast", "Transpose"})


def _feeds_weight(value: ir.Value) -> bool:
    for use in value.uses():
        if use.node.op_type in _GEMM_OPS and use.idx == 1:
            return True
        if use.node.op_type in _PASS_THROUGH | _FOLDABLE and use.idx == 0 and any(
                _feeds_weight(out) for out in use.node.outputs):
            return True
    return False


def _folded(node: ir.Node, data: np.ndarray) -> np.ndarray | None:
    if node.op_type == "Flatten":
        axis = node.attributes.get_int("axis", 1)
        axis = axis + data.ndim if axis < 0 else axis
        return data.reshape(int(np.prod(data.shape[:axis], dtype=np.int64)), -1)
    shape = _constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if shape is None:
        return None
    shape = [int(d) for d in shape.reshape(-1)]
    if not node.attributes.get_int("allowzero", 0):
        shape = [data.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return data.reshape(shape)


def fold_constant_weight_reshapes(model: ir.Model) -> list[str]:
    """Fold every foldable reshape on a weight path of the main graph; the names folded."""
    graph = model.graph
    folded = []
    changed = True
    while changed:  # a chain Reshape(Reshape(W)) folds from the root outwards
        changed = False
        for node in list(graph):
            if node.op_type not in _FOLDABLE or node.domain not in ("", "ai.onnx"):
                continue
            out = node.outputs[0]
            data = _constant(node.inputs[0])
            if data is None or out in graph.outputs or not _feeds_weight(out):
                continue
            array = _folded(node, data)
            if array is None:
                continue
            name = out.name
            tensor = ir.tensor(np.ascontiguousarray(array), name=name)
            value = ir.Value(name=None, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype),
                             const_value=tensor)
            source = node.inputs[0]
            out.replace_all_uses_with(value)
            graph.remove(node, safe=True)
            if source.is_initializer() and not source.uses() and source not in graph.inputs:
                graph.initializers.pop(source.name)  # the stored layout has no other reader
            value.name = name
            graph.register_initializer(value)
            folded.append(name)
            changed = True
    return folded
