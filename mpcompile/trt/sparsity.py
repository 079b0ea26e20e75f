"""Build-log and inspector evidence → one sparsity verdict per ONNX node: our table.

Evidence, per ONNX node: *eligible* if the build log lists a layer holding it as eligible, or a
layer holding it reports ``HasSparseWeights: 1``; *picked sparse* if the log lists it as picked,
or its layer's tactic name is a sparse kernel (contains ``sparse`` or ``sptensor``, e.g.
``sm80_xmma_fprop_sparse_conv_...``). ``HasSparseWeights`` alone is not "picked" (TensorRT#4694:
``HasSparseWeights=1`` with a dense tactic). The pruned-but-dense rows are what ``build --dense``
gives dense weights back to (:mod:`mpcompile.revert`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpcompile.trt.layer_map import NOT_ONNX, map_layer_name, strip_suffixes
from mpcompile.trt.log_parse import SparsityLog

if TYPE_CHECKING:  # inspector re-exports this module, so no import of it at run time
    from mpcompile.trt.inspector import EngineInfo

__all__ = ["GEMM_OPS", "NodeSparsity", "SparsityTable", "onnx_node_index", "sparsity_table"]

GEMM_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "FusedMatMul", "MatMulInteger",
                      "QLinearMatMul", "QLinearConv", "ConvInteger", "Einsum"})



@dataclass
class NodeSparsity:
    """What TensorRT did with one ONNX node.

    Attributes:
        status: ``sparse`` (pruned, sparse tactic), ``pruned-but-dense`` (eligible, dense tactic
            was faster), ``pruned-not-eligible`` (in the engine, weights not accepted as 2:4),
            ``pruned-not-found`` (no engine layer could be tied to it), ``eligible-not-pruned``,
            ``sparse-not-pruned`` (dense weights that happen to be 2:4).
        pruned_but_dense: pruned and no evidence of a sparse tactic — the layers whose dense
            weights can be restored for free accuracy.
    """

    onnx_node: str
    op_type: str | None
    pruned: bool
    eligible: bool
    picked_sparse: bool
    trt_layers: list[str] = field(default_factory=list)
    tactic_names: list[str] = field(default_factory=list)
    precision: str | None = None
    status: str = ""

    @property
    def pruned_but_dense(self) -> bool:
        return self.pruned and not self.picked_sparse

    def to_dict(self) -> dict:
        data = asdict(self)
        data["pruned_but_dense"] = self.pruned_but_dense
        return data


@dataclass
class SparsityTable:
    """Per-ONNX-node verdicts plus the TensorRT names that could not be tied to a node."""

    rows: list[NodeSparsity]
    unmapped_layers: list[str] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)

    def row(self, node: str) -> NodeSparsity | None:
        for row in self.rows:
            if row.onnx_node == node:
                return row
        return None

    @property
    def pruned_but_dense(self) -> list[str]:
        return [r.onnx_node for r in self.rows if r.pruned_but_dense]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.rows:
            out[row.status] = out.get(row.status, 0) + 1
        return out

    def summary(self) -> str:
        pruned = [r for r in self.rows if r.pruned]
        sparse = sum(r.picked_sparse for r in pruned)
        eligible = sum(r.eligible for r in pruned)
        return (f"{len(pruned)} pruned nodes: {eligible} eligible, {sparse} on sparse tactics, "
                f"{len(pruned) - sparse} pruned but dense")

    def to_dict(self) -> dict:
        return {"rows": [r.to_dict() for r in self.rows], "unmapped_layers": list(self.unmapped_layers),
                "evidence": list(self.evidence), "counts": self.counts(),
                "pruned_but_dense": self.pruned_but_dense}


def onnx_node_index(model: str | Path | Any) -> dict[str, str]:
    """Node name → op type, in graph order, for a path or ``onnx.ModelProto`` (weights not loaded).

    Unnamed nodes get ``<op>_<index>`` like the checker names them.
    """
    import onnx  # core dependency; imported here to keep this module light

    if not hasattr(model, "graph"):
        model = onnx.load(str(model), load_external_data=False)
    return {(node.name or f"{node.op_type}_{i}"): node.op_type for i, node in enumerate(model.graph.node)}


def _status(pruned: bool, eligible: bool, picked: bool, found: bool) -> str:
    if pruned:
        if picked:
            return "sparse"
        if eligible:
            return "pruned-but-dense"
        return "pruned-not-eligible" if found else "pruned-not-found"
    if picked:
        return "sparse-not-pruned"
    return "eligible-not-pruned" if eligible else "dense"


def sparsity_table(
    pruned: Iterable[str],
    engine: EngineInfo | None = None,
    log: SparsityLog | None = None,
    onnx_nodes: Mapping[str, str] | Sequence[str] | None = None,
) -> SparsityTable:
    """Join build-log and inspector evidence into one row per relevant ONNX node.

    Args:
        pruned: ONNX node names whose weights were written as 2:4.
        engine: parsed inspector output of the *sparse* engine (optional).
        log: parsed builder log of the same build (optional).
        onnx_nodes: node name → op type (:func:`onnx_node_index`) or names in graph order. With
            op types, non-pruned rows are limited to GEMM-like ops (a ``Conv + Relu`` layer
            does not make the Relu a row).

    Rows: every pruned node, then every other node with eligible/sparse evidence.
    """
    pruned_list = list(dict.fromkeys(pruned))
    pruned_set = set(pruned_list)
    op_types = dict(onnx_nodes) if isinstance(onnx_nodes, Mapping) else {}
    order = list(onnx_nodes) if onnx_nodes is not None else None
    known: set[str] | None = set(order) | pruned_set if order is not None else (pruned_set or None)
    evidence = []
    if engine is not None:
        evidence.append("inspector" + ("" if engine.detailed else " (names only)"))
    if log is not None:
        evidence.append("build log" + ("" if log.eligible_line_found else " (no sparsity lines)"))

    eligible: set[str] = set()
    picked: set[str] = set()
    found: set[str] = set()
    layers_of: dict[str, list[str]] = {}
    tactics_of: dict[str, list[str]] = {}
    precision_of: dict[str, str] = {}
    unmapped: list[str] = []

    def resolve(name: str, metadata: str | None = None, has_evidence: bool = True) -> list[str]:
        matched, missing = map_layer_name(name, known, order, metadata)
        if onnx_nodes is None and known is not None:
            # No full node list: tokens that are not pruned nodes are still worth a row.
            matched = matched + [strip_suffixes(m) for m in missing if not m.startswith(NOT_ONNX)]
            missing = [m for m in missing if m.startswith(NOT_ONNX)]
        if missing and not matched and has_evidence:
            unmapped.append(name)
        return matched

    if engine is not None:
        for layer in engine.layers:
            nodes = resolve(layer.name, layer.metadata, bool(layer.has_sparse_weights or layer.sparse_tactic))
            for node in nodes:
                found.add(node)
                layers_of.setdefault(node, []).append(layer.name)
                if layer.tactic_name:
                    tactics_of.setdefault(node, []).append(layer.tactic_name)
                if layer.precision and node not in precision_of:
                    precision_of[node] = layer.precision
                if layer.has_sparse_weights:
                    eligible.add(node)
                if layer.sparse_tactic:
                    picked.add(node)
                    eligible.add(node)
    if log is not None:
        for name in log.eligible_layers:
            for node in resolve(name):
                eligible.add(node)
                found.add(node)
                if name not in layers_of.setdefault(node, []):
                    layers_of[node].append(name)
        for name in log.picked_sparse_layers:
            for node in resolve(name):
                picked.add(node)
                eligible.add(node)
                found.add(node)
                if name not in layers_of.setdefault(node, []):
                    layers_of[node].append(name)

    def row(node: str) -> NodeSparsity:
        is_pruned = node in pruned_set
        return NodeSparsity(
            onnx_node=node,
            op_type=op_types.get(node),
            pruned=is_pruned,
            eligible=node in eligible,
            picked_sparse=node in picked,
            trt_layers=layers_of.get(node, []),
            tactic_names=list(dict.fromkeys(tactics_of.get(node, []))),
            precision=precision_of.get(node),
            status=_status(is_pruned, node in eligible, node in picked, node in found),
        )

    rows = [row(node) for node in pruned_list]
    extra = [n for n in (order or []) if n in eligible | picked and n not in pruned_set]
    extra += sorted((eligible | picked) - pruned_set - set(extra))
    for node in extra:
        if op_types and op_types.get(node) not in GEMM_OPS:
            continue
        rows.append(row(node))
    return SparsityTable(rows=rows, unmapped_layers=list(dict.fromkeys(unmapped)), evidence=evidence)
