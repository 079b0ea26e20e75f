"""Sequential calibration: the layer-wise stages run chunk by chunk, each chunk captured on
the model the earlier chunks already made sparse (the SparseGPT/Wanda reference protocol).

Why chunks by *depth*: a layer's input statistics only change when a layer upstream of it
is masked, so layers whose inputs do not depend on each other's outputs (q/k/v of one block,
the siblings reading one tensor) can share one capture pass. The depth of a selected layer
is the largest number of selected layers on any data path from the graph inputs to its
activation input, read from the graph's dependency order (never from names): a transformer
block then costs four passes (q/k/v, output projection, FFN up, FFN down), not one per layer.

Two things must not be split across chunks, so they are united with the earliest member:
- the readers of one stored weight (a shared weight is masked once, with the merged
  statistics of every reader: in the chunk of its first consumer);
- the siblings reading one tensor (one channel permutation is searched and folded for all
  of them; a later chunk permuting the columns of an already masked sibling would break
  its 2:4 groups).
A permutation folded later into an already masked *producer* only reorders its rows, which
keeps 2:4; its :class:`LayerMask` record is re-framed (``_reframe_folded``) so the measured
choice and the report read weights in the model's current channel order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from mpcompile.passes.gemm_discovery import GemmLayer, node_subgraphs
from mpcompile.passes.permute_channels import OUTPUT_ORDER_KEY
from mpcompile.stages.options import CALIBRATION_PROTOCOLS, DATA_METHODS
from mpcompile.stages.state import CompileState, Stage, run_stages

__all__ = ["CALIBRATION_PROTOCOLS", "depth_chunks", "layer_depths", "run_layer_stages"]


def layer_depths(model: ir.Model, layers: Sequence[GemmLayer]) -> dict[ir.Node, int]:
    """Depth of each of ``layers``: how many of them lie on the longest path to its input.

    Values are walked in the graph's (topological) node order; a control-flow node's outputs
    are as deep as the deepest value its bodies read or compute, so a layer after a loop
    whose body holds a selected layer comes after that layer.
    """
    selected = {layer.node for layer in layers}
    level: dict[ir.Value, int] = {}
    depth: dict[ir.Node, int] = {}

    def of(value: ir.Value | None) -> int:
        return level.get(value, 0) if value is not None else 0

    def walk(graph: ir.Graph, base: int) -> int:
        """Set levels of ``graph``'s values; return the deepest level of its outputs."""
        for value in graph.inputs:
            level.setdefault(value, base)
        for node in graph:
            reached = max((of(v) for v in node.inputs), default=base)
            reached = max(reached, base)
            for _name, body in node_subgraphs(node):
                reached = max(reached, walk(body, reached))
            if node in selected:
                depth[node] = max(of(node.inputs[0]) if node.inputs else base, base)
                reached = max(reached, depth[node] + 1)
            for value in node.outputs:
                level[value] = reached
        return max((of(v) for v in graph.outputs), default=base)

    walk(model.graph, 0)
    return depth


def depth_chunks(model: ir.Model, layers: Sequence[GemmLayer]) -> list[list[GemmLayer]]:
    """``layers`` split into capture chunks, shallowest first, each in ``layers``' order.

    Readers of one weight and readers of one tensor are kept in one chunk, the earliest of
    their depths (see the module docstring).
    """
    layers = list(layers)
    depth = layer_depths(model, layers)
    parent = list(range(len(layers)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    firsts: dict[object, int] = {}
    for index, layer in enumerate(layers):
        keys = [("weight", id(layer.weight.root))]
        if layer.node.inputs and layer.node.inputs[0] is not None:
            keys.append(("input", id(layer.node.inputs[0])))
        for key in keys:
            if key in firsts:
                parent[find(index)] = find(firsts[key])
            else:
                firsts[key] = index
    group_depth: dict[int, int] = {}
    for index, layer in enumerate(layers):
        root = find(index)
        group_depth[root] = min(group_depth.get(root, depth[layer.node]), depth[layer.node])
    chunks: dict[int, list[GemmLayer]] = {}
    for index, layer in enumerate(layers):
        chunks.setdefault(group_depth[find(index)], []).append(layer)
    return [chunks[d] for d in sorted(chunks)]


def sequential_applies(state: CompileState) -> bool:
    """Whether this compile calibrates chunk by chunk (a data method, 2:4, not ``dense``)."""
    return (state.options.calibration == "sequential" and state.method in DATA_METHODS
            and not state.unstructured)


def run_layer_stages(stages: Sequence[Stage], state: CompileState) -> None:
    """Run the layer-wise ``stages`` once (dense protocol) or once per depth chunk."""
    if not sequential_applies(state):
        state.calibration_protocol = state.options.calibration if state.method in DATA_METHODS else None
        run_stages(stages, state)
        return
    chunks = depth_chunks(state.model, state.selected)
    state.calibration_protocol = "sequential"
    for chunk in chunks:
        names = {layer.name for layer in chunk}
        before = _stored_tensors(state)
        run_stages(stages, state, layers=chunk)
        _reframe_folded(state, before, skip=names)
    if len(chunks) > 1:
        state.notes.append(
            f"sequential calibration: {len(chunks)} depth groups, each captured on the model with the earlier "
            f"groups already 2:4 ({state.capture_passes} ONNX Runtime capture passes)")


def _by_name(state: CompileState) -> dict[str, GemmLayer]:
    return {layer.name: layer for layer in state.selected}


def _stored_tensors(state: CompileState) -> dict[str, object]:
    layers = _by_name(state)
    return {m.layer: layers[m.layer].weight.root.const_value for m in state.masks if m.layer in layers}


def _reframe_folded(state: CompileState, before: dict[str, object], skip: set[str]) -> None:
    """Re-frame the records of masked layers whose output rows a later fold permuted."""
    layers = _by_name(state)
    for mask in state.masks:
        if mask.layer in skip or mask.layer not in before:
            continue
        layer = layers[mask.layer]
        if layer.weight.root.const_value is before[mask.layer]:
            continue
        current = layer.matrix()
        order = layer.node.metadata_props.get(OUTPUT_ORDER_KEY)
        perm = np.array([int(i) for i in order.split(",")]) if order else None
        if perm is None or perm.shape[0] != mask.sparse.shape[0] or not np.array_equal(current, mask.sparse[perm]):
            raise RuntimeError(f"{mask.layer}: its masked weight changed in a later chunk other than by a row "
                               "permutation of a folded channel order")
        source = mask.dense_source
        mask.sparse = current
        if source is not None:
            mask.dense_source = lambda source=source, perm=perm: source()[perm]
