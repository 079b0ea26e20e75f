"""PermuteChannelsPass: reorder a GEMM's input channels and fold the reorder into the producer.

Why: 2:4 keeps the top 2 of every 4 consecutive input channels, so a permutation search
(``mpcompile.numerics.permutation``) picks an order that keeps more weight magnitude. The
consumer then reads ``W_in`` with its input-channel axis taken as ``W_in[..., perm]``. For the
model to compute the same function its input must arrive in that order too, which is free if
the producer GEMM emits its output channels as ``perm`` (weight output axis and bias) and every
per-channel op in between takes its constants as ``c[perm]`` (see ``_channel_graph`` for the
math and the blocking rules). Siblings reading the same tensor (q, k, v) share the order.

Layouts (effective weight, i.e. as the node receives it):
- producer output axis: MatMul ``W[K, N]`` axis 1; Gemm transB=1 axis 0, transB=0 axis 1, plus
  a per-channel C; Conv axis 0 and its bias.
- consumer input axis: MatMul axis 0 (``W[perm, :]``); Gemm transB=1 axis 1, transB=0 axis 0;
  Conv axis 1 (``W[:, perm]``).
Weights reached through Transpose/Cast/Identity chains are permuted in the stored tensor on the
axis mapped back through the Transpose perms.

Safety: a stored constant is rewritten only when every node reading it is part of this fold and
wants it on the same axis; otherwise a new initializer ``<name>__perm`` is registered and only
the fold's readers are rewired (their Transpose/Cast chain is cloned). Arrays are never
modified in place. Where folding is blocked, ``insert_gather`` (``--allow-gather``) puts an
explicit Gather on the channel axis before the consumers instead; that costs a copy at run
time, so it is recorded in ``metadata_props`` and in the pass's records.

Length (~430 lines): planning and applying a fold share the edit list of one region; they
stay together so a plan can never be applied by code that reads it differently.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from mpcompile.errors import UsageError
from mpcompile.passes._channel_graph import (
    CONSUMER_WEIGHT_AXIS,
    ConstEdit,
    analyse_region,
    consumer_axis,
)
from mpcompile.passes.gemm_discovery import GemmLayer, discover_gemms, trace_weight

__all__ = [
    "INPUT_ORDER_KEY", "OUTPUT_ORDER_KEY", "PERMUTATION_KEY", "SUBGRAPH_REASON", "FoldPlan", "PermutationRecord",
    "PermuteChannelsPass", "apply_fold",
    "insert_gather", "plan_fold",
]

logger = logging.getLogger(__name__)

PERMUTATION_KEY = "mpcompile.permutation"
# The orders themselves, so that a later revert (``mpcompile.revert``) can write a dense weight
# in the permuted frame: consumers hold their input-channel order, the producer its output order.
INPUT_ORDER_KEY = "mpcompile.input_order"
OUTPUT_ORDER_KEY = "mpcompile.output_order"
_CHAIN_OPS = ("Transpose", "Cast", "Identity", "DequantizeLinear")
SUBGRAPH_REASON = ("inside an If/Loop/Scan body: channel permutations are not folded into or "
                   "across subgraphs")


@dataclass
class FoldPlan:
    """What permuting one tensor's channel axis would touch, or why it cannot be folded.

    Attributes:
        tensor: the tensor whose channel axis is permuted (input of the consumers).
        consumers: GEMM/Conv layers reading the permuted order (siblings share it).
        producer: the GEMM/Conv whose output channels get permuted.
        through: per-channel / pass-through nodes between producer and consumers.
        foldable: whether ``apply_fold`` may run.
        reason: why not (empty when foldable).
        layer: the layer the plan was made for.
        channels: length of the permutation.
        edits: every constant to permute (producer, through nodes, consumers).
    """

    tensor: ir.Value | None
    consumers: list[GemmLayer]
    producer: ir.Node | None
    through: list[ir.Node]
    foldable: bool
    reason: str
    layer: GemmLayer | None = None
    channels: int = 0
    edits: list[ConstEdit] = field(default_factory=list, repr=False)


@dataclass
class PermutationRecord:
    """Outcome of one requested permutation, for the report."""

    key: str
    layers: list[str]
    status: str  # "folded" | "gather" | "skipped"
    reason: str = ""


def plan_fold(model: ir.Model, layer: GemmLayer, layers: list[GemmLayer]) -> FoldPlan:
    """Analyse whether ``layer``'s input-channel permutation can be folded into its producer."""
    if layer.node.graph is not model.graph:
        # Folding edits constants by graph; a region inside (or reaching into) an If/Loop/Scan
        # body would need those edits scoped per body, so such layers keep their order.
        return FoldPlan(tensor=layer.node.inputs[0], consumers=[layer], producer=None, through=[],
                        foldable=False, reason=SUBGRAPH_REASON, layer=layer,
                        channels=layer.in_channels)
    region = analyse_region(layer, layers)
    plan = FoldPlan(
        tensor=layer.node.inputs[0],
        consumers=region.consumers,
        producer=region.producer,
        through=region.through,
        foldable=not region.reason,
        reason=region.reason,
        layer=layer,
        channels=layer.in_channels,
        edits=region.edits,
    )
    logger.debug("plan for %s: %s", layer.name, "foldable" if plan.foldable else plan.reason)
    return plan


def _check_perm(perm: np.ndarray, channels: int) -> np.ndarray:
    arr = np.asarray(perm)
    if (
        arr.ndim != 1
        or arr.size != channels
        or arr.dtype.kind not in "iu"
        or not np.array_equal(np.sort(arr), np.arange(channels))
    ):
        raise UsageError(
            f"permutation must be a 1-D integer permutation of range({channels}), "
            f"got shape {arr.shape} dtype {arr.dtype}"
        )
    return arr.astype(np.int64)


def apply_fold(model: ir.Model, plan: FoldPlan, perm: np.ndarray) -> None:
    """Permute producer output channels, per-channel constants and consumer inputs; exact."""
    if not plan.foldable:
        raise UsageError(
            f"cannot fold the permutation of '{plan.layer.name if plan.layer else '?'}': "
            f"{plan.reason}"
        )
    perm = _check_perm(perm, plan.channels)
    _apply_edits(model.graph, plan.edits, perm)
    order = ",".join(map(str, perm.tolist()))
    for consumer in plan.consumers:
        consumer.node.metadata_props[PERMUTATION_KEY] = "folded"
        consumer.node.metadata_props[INPUT_ORDER_KEY] = order
    if plan.producer is not None:
        plan.producer.metadata_props[OUTPUT_ORDER_KEY] = order
    logger.info("folded a %d-channel permutation into %s (%d consumers, %d nodes between)",
                plan.channels, plan.producer.name if plan.producer else "?",
                len(plan.consumers), len(plan.through))


def insert_gather(
    model: ir.Model, plan_or_layer: FoldPlan | GemmLayer, perm: np.ndarray
) -> ir.Node:
    """Fallback: ``Gather(x, perm, axis=channels)`` before the consumers; permute their weights.

    With a FoldPlan, the consumers in it that read ``plan.tensor`` directly and read channels
    like ``plan.layer`` share one Gather (others keep the original tensor); with a GemmLayer
    only that layer is rewired. Returns the Gather node, marked in ``metadata_props`` because
    it is a run-time copy of the activation.
    """
    if isinstance(plan_or_layer, FoldPlan):
        tensor, layer = plan_or_layer.tensor, plan_or_layer.layer
        candidates = [c for c in plan_or_layer.consumers if c.node.inputs[0] is tensor]
    else:
        tensor, layer, candidates = plan_or_layer.node.inputs[0], plan_or_layer, [plan_or_layer]
    if tensor is None or layer is None:
        raise UsageError("insert_gather needs a layer with an activation input")
    if layer.node.graph is not model.graph:
        raise UsageError(f"cannot insert a Gather for '{layer.name}': {SUBGRAPH_REASON}")
    candidates = [c for c in candidates if c.node.graph is model.graph]  # bodies keep the original
    perm = _check_perm(perm, layer.in_channels)
    axis = consumer_axis(layer)[0]
    consumers = [c for c in {layer.node: layer, **{c.node: c for c in candidates}}.values()
                 if _gatherable(c) and consumer_axis(c)[0] == axis
                 and c.in_channels == layer.in_channels]
    if layer.node not in {c.node for c in consumers}:
        raise UsageError(f"cannot permute the input channels of '{layer.name}' with a Gather: "
                         "grouped conv, transA=1 or a weight behind a DequantizeLinear")
    graph = model.graph
    names = _used_names(graph)
    indices = _new_initializer(graph, names, f"{tensor.name or 'x'}__perm_idx", perm)
    gather = ir.node("Gather", [tensor, indices], {"axis": axis},
                     name=_unique(names, f"{tensor.name or 'x'}__perm_gather"))
    gather.outputs[0].name = _unique(names, f"{tensor.name or 'x'}__permuted")
    gather.outputs[0].type = tensor.type
    gather.outputs[0].shape = None if tensor.shape is None else ir.Shape(tensor.shape)
    gather.metadata_props[PERMUTATION_KEY] = "gather"
    consumer_nodes = {c.node for c in consumers}
    first = next(node for node in graph if node in consumer_nodes)
    graph.insert_before(first, gather)
    for c in consumers:
        c.node.replace_input_with(0, gather.outputs[0])
        c.node.metadata_props[PERMUTATION_KEY] = "gather"
        c.node.metadata_props[INPUT_ORDER_KEY] = ",".join(map(str, perm.tolist()))
    edits = [ConstEdit(c.node, c.weight_input, CONSUMER_WEIGHT_AXIS[c.layout], "consumer weight")
             for c in consumers]
    _apply_edits(graph, edits, perm)
    logger.info("inserted Gather %s before %s (run-time channel copy)", gather.name,
                ", ".join(c.name for c in consumers))
    return gather


def _gatherable(layer: GemmLayer) -> bool:
    return (layer.group == 1 and not layer.node.attributes.get_int("transA", 0)
            and all(n.op_type in ("Transpose", "Cast", "Identity") for n in layer.weight.chain))


# -- constant rewriting -------------------------------------------------------------------------


def _used_names(graph: ir.Graph) -> set[str]:
    names = set(graph.initializers) | {v.name for v in graph.inputs if v.name}
    for node in graph:
        names.update(v.name for v in node.outputs if v.name)
        if node.name:
            names.add(node.name)
    return names


def _unique(names: set[str], base: str) -> str:
    name, i = base, 1
    while name in names:
        name, i = f"{base}{i}", i + 1
    names.add(name)
    return name


def _new_initializer(graph: ir.Graph, names: set[str], base: str, array: np.ndarray) -> ir.Value:
    name = _unique(names, base)
    tensor = ir.tensor(array, name=name)
    value = ir.Value(
        name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor
    )
    graph.register_initializer(value)
    return value


def _stored_array(root: ir.Value) -> np.ndarray:
    producer = root.producer()
    if producer is not None and producer.op_type == "Constant":
        return producer.attributes["value"].as_tensor().numpy()
    return root.const_value.numpy()


def _stored_axis(chain: list[ir.Node], axis: int, ndim: int) -> int:
    for node in reversed(chain):  # output axis a of Transpose(perm) is its input axis perm[a]
        if node.op_type == "Transpose":
            perm = node.attributes.get_ints("perm", None) or list(reversed(range(ndim)))
            axis = int(perm[axis])
    return axis


def _readers(root: ir.Value) -> set[object]:
    """Every (node, input) reading ``root`` through chain ops, plus graph outputs on the way."""
    sites: set[object] = set()
    stack = [root]
    while stack:
        value = stack.pop()
        if value.is_graph_output():
            sites.add(("graph-output", value))
        for use in value.uses():
            if use.node.op_type in _CHAIN_OPS and use.idx == 0:
                stack.extend(use.node.outputs)
            else:
                sites.add((use.node, use.idx))
    return sites


def _apply_edits(graph: ir.Graph, edits: list[ConstEdit], perm: np.ndarray) -> None:
    groups: dict[ir.Value, list[tuple[ConstEdit, list[ir.Node], int]]] = {}
    seen: set[tuple[ir.Node, int]] = set()
    for edit in edits:
        if (edit.node, edit.index) in seen:
            continue
        seen.add((edit.node, edit.index))
        source = trace_weight(edit.node.inputs[edit.index])
        assert source is not None, "plan edits only constants"
        ndim = len(_stored_array(source.root).shape)
        groups.setdefault(source.root, []).append(
            (edit, source.chain, _stored_axis(source.chain, edit.axis, ndim))
        )
    names: set[str] | None = None
    for root, items in groups.items():
        stored = _stored_array(root)
        axes = {axis for _, _, axis in items}
        sites = {(edit.node, edit.index) for edit, _, _ in items}
        if len(axes) == 1 and _readers(root) == sites and not root.is_graph_input():
            _replace_stored(root, np.take(stored, perm, axis=axes.pop()))
            continue
        names = names if names is not None else _used_names(graph)
        copies: dict[int, ir.Value] = {}
        for edit, chain, axis in items:
            if axis not in copies:
                copies[axis] = _new_initializer(
                    graph, names, f"{root.name or 'const'}__perm", np.take(stored, perm, axis=axis)
                )
            _rewire(graph, names, edit, chain, copies[axis])
        logger.debug(
            "'%s' is read outside the fold: wrote %d permuted copies", root.name, len(copies)
        )
        _drop_if_unused(graph, root)


def _replace_stored(root: ir.Value, array: np.ndarray) -> None:
    """Swap in a new tensor object (the old one may be shared or memory-mapped)."""
    producer = root.producer()
    if producer is not None and producer.op_type == "Constant":
        producer.attributes["value"] = ir.AttrTensor("value", ir.tensor(array, name=root.name))
        if root.const_value is None:
            return
    root.const_value = ir.tensor(array, name=root.name)


def _rewire(
    graph: ir.Graph, names: set[str], edit: ConstEdit, chain: list[ir.Node], new_root: ir.Value
) -> None:
    value = new_root
    for node in chain:  # clone the Transpose/Cast chain so the other readers keep theirs
        attrs = [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()]
        clone = ir.Node(node.domain, node.op_type, [value], attrs, version=node.version,
                        name=_unique(names, f"{node.name or node.op_type}__perm"))
        clone.outputs[0].name = _unique(names, f"{node.outputs[0].name or 'v'}__perm")
        clone.outputs[0].type = node.outputs[0].type
        clone.outputs[0].shape = (
            None if node.outputs[0].shape is None else ir.Shape(node.outputs[0].shape)
        )
        graph.insert_before(edit.node, clone)
        value = clone.outputs[0]
    old = edit.node.inputs[edit.index]
    edit.node.replace_input_with(edit.index, value)
    _drop_chain_if_unused(graph, old)


def _drop_chain_if_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    while value is not None and not value.uses() and not value.is_graph_output():
        node = value.producer()
        if node is None or node.op_type not in _CHAIN_OPS or node.graph is not graph:
            _drop_if_unused(graph, value)
            return
        upstream = node.inputs[0]
        graph.remove(node, safe=True)
        value = upstream


def _drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    if value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    if value.is_initializer() and value.name in graph.initializers:
        del graph.initializers[value.name]
    elif (node := value.producer()) is not None and node.op_type == "Constant" \
            and node.graph is graph:
        graph.remove(node, safe=True)


# -- the pass -----------------------------------------------------------------------------------


def _resolve(key: str, layers: list[GemmLayer]) -> GemmLayer:
    for match in (lambda c: c.name == key, lambda c: c.node.name == key,
                  lambda c: c.node.inputs[0] is not None and c.node.inputs[0].name == key):
        found = [c for c in layers if match(c)]
        if found:
            return found[0]
    raise UsageError(f"no GEMM/Conv layer or layer input tensor named '{key}'")


class PermuteChannelsPass(ir.passes.InPlacePass):
    """Apply input-channel permutations, folded into producers where possible.

    Attributes:
        perms: ``{layer name, node name or input tensor name: perm}``; siblings reading one
            tensor take one permutation, so give it once (a repeat must be identical).
        allow_gather: insert a run-time Gather where folding is blocked instead of skipping.
        records: one :class:`PermutationRecord` per requested key, filled by each call.
    """

    def __init__(self, perms: Mapping[str, np.ndarray], *, allow_gather: bool = False) -> None:
        super().__init__()
        self.perms = dict(perms)
        self.allow_gather = allow_gather
        self.records: list[PermutationRecord] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.records = []
        layers = discover_gemms(model)
        for key, perm in self.perms.items():  # refuse bad input before touching the model
            _check_perm(perm, _resolve(key, layers).in_channels)
        done: dict[ir.Node, np.ndarray] = {}
        for key, perm in self.perms.items():
            layers = discover_gemms(model)
            layer = _resolve(key, layers)
            plan = plan_fold(model, layer, layers)
            targets = plan.consumers if plan.foldable else [layer]
            prior = [done[c.node] for c in targets if c.node in done]
            names = [c.name for c in targets]
            if prior:
                same = len(prior) == len(targets) and all(np.array_equal(p, perm) for p in prior)
                why = "already permuted (sibling)" if same else "conflicts with a sibling's order"
                self.records.append(PermutationRecord(key, names, "skipped", why))
                continue
            if plan.foldable:
                apply_fold(model, plan, perm)
                self.records.append(PermutationRecord(key, names, "folded"))
            elif self.allow_gather:
                try:
                    gather = insert_gather(model, plan, perm)
                except UsageError as exc:
                    reason = f"{plan.reason}; no Gather either: {exc}"
                    self.records.append(PermutationRecord(key, names, "skipped", reason))
                    continue
                targets = [c for c in plan.consumers if c.node.inputs[0] is gather.outputs[0]]
                names = [c.name for c in targets]
                self.records.append(PermutationRecord(key, names, "gather", plan.reason))
            else:
                logger.info("permutation for %s skipped: %s", layer.name, plan.reason)
                self.records.append(PermutationRecord(key, names, "skipped", plan.reason))
                continue
            for c in targets:
                done[c.node] = np.asarray(perm)
        changed = sum(r.status in ("folded", "gather") for r in self.records)
        counts = [sum(r.status == s for r in self.records) for s in ("folded", "gather", "skipped")]
        logger.info("PermuteChannelsPass: %d folded, %d gathers, %d skipped", *counts)
        return ir.passes.PassResult(model, modified=bool(changed))
