"""Engine-inspector JSON → per-layer records → per-ONNX-node sparsity verdict.

Why: "did my pruned layer get a sparse kernel?" is answered per *TensorRT layer*, but users
prune *ONNX nodes*, and TensorRT renames and fuses them. This module parses the whole-engine
JSON of ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)`` (also what
``trtexec --exportLayerInfo`` writes)::

    {"Layers": [{"Name": "Conv_0 + Relu_1", "LayerType": "CaskConvolution",
                 "ParameterType": "Convolution", "Inputs": [...], "Outputs": [...],
                 "HasSparseWeights": 1, "TacticName": "sm80_xmma_fprop_sparse_conv_...",
                 "Metadata": "[ONNX Layer: Conv_0]\\x1f[ONNX Layer: Relu_1]", ...}, ...],
     "Bindings": ["input", "output"]}

At ``ProfilingVerbosity.DETAILED`` each layer is a dict; at ``LAYER_NAMES_ONLY`` (the default,
TensorRT#4020) ``Layers`` is a list of names — parsed too, flagged ``detailed=False``. Engines
with several optimisation profiles repeat every layer with a `` [profile N]`` suffix; profile 0
is kept by default (as TensorRT Engine Explorer does).

Name mapping, most reliable first: the ``Metadata`` field (TensorRT 8.6+) lists the ONNX nodes
as ``[ONNX Layer: name]`` separated by ``\\x1e``/``\\x1f``; otherwise the layer name is
tokenised: fused layers join names with `` + ``, pointwise fusions read ``PWN(a, PWN(b, c))``,
Myelin regions read ``{ForeignNode[first...last]}`` (expanded to the ONNX nodes between
``first`` and ``last`` in graph order when that order is known — an approximation: Myelin may
skip nodes in that range), and tokens may carry suffixes (``_output``, `` [Convolution]``) or be
wrapped in TensorRT-made names (``squeeze_after_/fc/MatMul``); a token is matched to the known
ONNX node names exactly, then without suffixes, then as the longest known name it contains at a
name boundary.

Evidence, per ONNX node: *eligible* if the build log lists a layer holding it as eligible, or a
layer holding it reports ``HasSparseWeights: 1``; *picked sparse* if the log lists it as picked,
or its layer's tactic name is a sparse kernel (contains ``sparse`` or ``sptensor``, e.g.
``sm80_xmma_fprop_sparse_conv_...``). ``HasSparseWeights`` alone is not "picked" (TensorRT#4694:
``HasSparseWeights=1`` with a dense tactic).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mpcompile.errors import MpcompileError, UsageError
from mpcompile.trt.log_parse import SparsityLog, split_layer_list

__all__ = [
    "GEMM_OPS",
    "EngineInfo",
    "NodeSparsity",
    "SparsityTable",
    "TrtLayer",
    "TrtTensor",
    "load_engine_info",
    "map_layer_name",
    "metadata_onnx_nodes",
    "onnx_node_index",
    "parse_engine_info",
    "sparsity_table",
]

logger = logging.getLogger(__name__)

GEMM_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "FusedMatMul", "MatMulInteger",
                      "QLinearMatMul", "QLinearConv", "ConvInteger", "Einsum"})
_PROFILE = re.compile(r"\s*\[profile\s+(\d+)\]\s*$")
_METADATA_ITEM = re.compile(r"\[ONNX Layer:\s*(.*?)\]\s*(?=[\x1e\x1f]|\[ONNX Layer:|$)", re.DOTALL)
_FOREIGN = re.compile(r"^\{ForeignNode\[(.*)\]\}$", re.DOTALL)
_PWN = re.compile(r"^PWN\((.*)\)$", re.DOTALL)
_SUFFIXES = (
    re.compile(r"\s*\[[^\[\]]*\]$"),  # " [Convolution]", "[...]"
    re.compile(r"_output(?:_\d+)?$"),
    re.compile(r"_(?:weights|bias|constant\w*|clone_\d+)$"),
)
_NOT_ONNX = ("Reformatting CopyNode", "(Unnamed Layer", "__myl_", "__mye")
_SPARSE_TACTIC = re.compile(r"sparse|sptensor|_sp_", re.IGNORECASE)
_PRECISIONS = (
    ("FP8", ("fp8", "e4m3")),
    ("BF16", ("bfloat16", "bf16")),
    ("FP16", ("fp16", "half")),
    ("INT8", ("int8",)),
    ("INT32", ("int32",)),
    ("INT64", ("int64",)),
    ("BOOL", ("bool",)),
    ("FP32", ("fp32", "float")),
)
_TACTIC_PRECISION = (
    ("INT8", re.compile(r"i8i8|int8|imma", re.IGNORECASE)),
    ("FP8", re.compile(r"e4m3|fp8", re.IGNORECASE)),
    ("BF16", re.compile(r"bf16", re.IGNORECASE)),
    ("FP16", re.compile(r"f16f16|h16816|h1688|hmma|fp16|_f16", re.IGNORECASE)),
    ("TF32", re.compile(r"tf32", re.IGNORECASE)),
    ("FP32", re.compile(r"f32f32|sgemm|fp32", re.IGNORECASE)),
)


@dataclass
class TrtTensor:
    """One input/output region of a layer as the inspector describes it."""

    name: str
    dimensions: list[int] = field(default_factory=list)
    format: str | None = None
    location: str | None = None


@dataclass
class TrtLayer:
    """One engine layer.

    Attributes:
        name: TensorRT layer name with any `` [profile N]`` suffix removed.
        layer_type: implementation (``"CaskConvolution"``, ``"gemm"``, ``"Myelin"``, ...).
        parameter_type: the builder layer kind (``"Convolution"``, ``"MatrixMultiply"``, ...).
        tactic_name: kernel name chosen by the builder, when reported.
        has_sparse_weights: ``HasSparseWeights`` (None when the field is absent).
        precision: compute precision inferred from the first input's ``Format/Datatype`` (or
            from the tactic name when formats are unknown, e.g. with dynamic shapes).
        onnx_nodes: ONNX node names from ``Metadata`` (empty when not reported).
        profile: optimisation-profile index (0 for the first / only profile).
    """

    name: str
    layer_type: str | None = None
    parameter_type: str | None = None
    tactic_name: str | None = None
    tactic_value: str | None = None
    has_sparse_weights: bool | None = None
    precision: str | None = None
    inputs: list[TrtTensor] = field(default_factory=list)
    outputs: list[TrtTensor] = field(default_factory=list)
    metadata: str | None = None
    onnx_nodes: list[str] = field(default_factory=list)
    profile: int = 0

    @property
    def sparse_tactic(self) -> bool:
        """The chosen kernel is a sparse-tensor-core kernel (by its name)."""
        return bool(self.tactic_name and _SPARSE_TACTIC.search(self.tactic_name))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["sparse_tactic"] = self.sparse_tactic
        return data


@dataclass
class EngineInfo:
    """All layers of one engine (one profile)."""

    layers: list[TrtLayer]
    bindings: list[str] = field(default_factory=list)
    detailed: bool = True
    profiles: int = 1

    def layer(self, name: str) -> TrtLayer | None:
        for layer in self.layers:
            if layer.name == name:
                return layer
        return None

    def to_dict(self) -> dict:
        return {"detailed": self.detailed, "profiles": self.profiles, "bindings": list(self.bindings),
                "layers": [layer.to_dict() for layer in self.layers]}


def _precision_from_format(text: str | None) -> str | None:
    if not text:
        return None
    lowered = text.lower()
    if "n/a" in lowered or "unknown" in lowered:
        return None
    for label, keys in _PRECISIONS:
        if any(key in lowered for key in keys):
            return label
    return None


def _precision_from_tactic(tactic: str | None) -> str | None:
    if not tactic:
        return None
    for label, pattern in _TACTIC_PRECISION:
        if pattern.search(tactic):
            return label
    return None


def metadata_onnx_nodes(metadata: str | None) -> list[str]:
    """ONNX node names in a ``Metadata`` field (``[ONNX Layer: a]\\x1f[ONNX Layer: b]``)."""
    if not metadata:
        return []
    names = []
    for part in re.split(r"[\x1e\x1f]", metadata):
        for match in _METADATA_ITEM.finditer(part.strip()):
            name = match.group(1).strip()
            if name and name not in names:
                names.append(name)
    return names


def _split_profile(name: str) -> tuple[str, int]:
    match = _PROFILE.search(name)
    if not match:
        return name, 0
    return name[: match.start()], int(match.group(1))


def _tensor(raw: Any) -> TrtTensor:
    if not isinstance(raw, Mapping):
        return TrtTensor(name=str(raw))
    dims = raw.get("Dimensions") or []
    return TrtTensor(
        name=str(raw.get("Name", "")),
        dimensions=[int(d) for d in dims] if isinstance(dims, list) else [],
        format=raw.get("Format/Datatype") or raw.get("Format"),
        location=raw.get("Location"),
    )


def _as_bool(value: Any) -> bool | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def _layer(raw: Mapping[str, Any]) -> TrtLayer:
    name, profile = _split_profile(str(raw.get("Name", "")))
    inputs = [_tensor(t) for t in raw.get("Inputs") or []]
    outputs = [_tensor(t) for t in raw.get("Outputs") or []]
    precision = raw.get("Precision")
    if not precision:
        for tensor in inputs + outputs:
            precision = _precision_from_format(tensor.format)
            if precision:
                break
    if not precision:
        precision = _precision_from_tactic(raw.get("TacticName"))
    metadata = raw.get("Metadata")
    return TrtLayer(
        name=name,
        layer_type=raw.get("LayerType"),
        parameter_type=raw.get("ParameterType"),
        tactic_name=raw.get("TacticName") or None,
        tactic_value=raw.get("TacticValue"),
        # TensorRT ≤ 8.5 engine inspectors name the field "AllowSparse"; later ones "HasSparseWeights"
        has_sparse_weights=_as_bool(raw.get("HasSparseWeights", raw.get("AllowSparse"))),
        precision=str(precision) if precision else None,
        inputs=inputs,
        outputs=outputs,
        metadata=metadata,
        onnx_nodes=metadata_onnx_nodes(metadata),
        profile=profile,
    )


def parse_engine_info(data: str | bytes | Mapping[str, Any], profile: int = 0) -> EngineInfo:
    """Parse the inspector's whole-engine JSON (text or already-decoded dict).

    Raises MpcompileError when the text is not the inspector's format.
    """
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as exc:
            raise MpcompileError(f"engine layer information is not valid JSON: {exc}") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("Layers"), list):
        raise MpcompileError('engine layer information has no "Layers" list (not IEngineInspector JSON)')
    raw_layers = data["Layers"]
    detailed = any(isinstance(item, Mapping) for item in raw_layers)
    layers: list[TrtLayer] = []
    seen_profiles = {0}
    for item in raw_layers:
        layer = _layer(item) if isinstance(item, Mapping) else _layer({"Name": str(item)})
        seen_profiles.add(layer.profile)
        if layer.profile == profile and layer.layer_type not in ("signal", "wait"):
            layers.append(layer)
    if profile not in seen_profiles:
        raise UsageError(f"engine has no optimisation profile {profile} (profiles: {sorted(seen_profiles)})")
    bindings = []
    for binding in data.get("Bindings") or []:
        name, bprofile = _split_profile(str(binding))
        if bprofile == profile:
            bindings.append(name)
    if not detailed:
        logger.warning("engine layer information has names only: build with "
                       "ProfilingVerbosity.DETAILED to see tactics and HasSparseWeights")
    return EngineInfo(layers=layers, bindings=bindings, detailed=detailed, profiles=len(seen_profiles))


def load_engine_info(path: str | Path, profile: int = 0) -> EngineInfo:
    """Read a layer-information JSON file (``trtexec --exportLayerInfo`` or our builder's)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"engine layer information file {path} does not exist")
    return parse_engine_info(path.read_text(encoding="utf-8", errors="replace"), profile=profile)


# ----------------------------------------------------------------------------- name mapping


def _top_level_split(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside (), [], {}."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        char = text[i]
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth = max(0, depth - 1)
        elif depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _tokens(name: str) -> list[str]:
    """Flatten fused / pointwise layer names into candidate node tokens."""
    out: list[str] = []
    for part in _top_level_split(name, " + "):
        match = _PWN.match(part)
        if match:
            for inner in split_layer_list(match.group(1)):
                out.extend(_tokens(inner))
        else:
            out.append(part)
    return out


def _strip_suffixes(token: str) -> str:
    previous = None
    while previous != token:
        previous = token
        for pattern in _SUFFIXES:
            stripped = pattern.sub("", token)
            if stripped:
                token = stripped
    return token


def _bounded_contains(haystack: str, needle: str) -> bool:
    """``needle`` occurs in ``haystack`` not glued to more name characters on either side."""
    start = haystack.find(needle)
    while start >= 0:
        end = start + len(needle)
        before_ok = start == 0 or not (haystack[start - 1].isalnum() and needle[0].isalnum())
        after_ok = end == len(haystack) or not (haystack[end].isalnum() and needle[-1].isalnum())
        if before_ok and after_ok:
            return True
        start = haystack.find(needle, start + 1)
    return False


def _match_token(token: str, known: Collection[str], by_length: Sequence[str]) -> str | None:
    if token in known:
        return token
    stripped = _strip_suffixes(token)
    if stripped in known:
        return stripped
    for name in by_length:  # longest first
        if len(name) < len(stripped) and _bounded_contains(stripped, name):
            return name
    return None


def _foreign_range(inner: str, known: Collection[str], order: Sequence[str] | None) -> list[str]:
    """``first...last`` → the ONNX nodes between them (inclusive) when the order is known."""
    cut_points = [m.start() for m in re.finditer(r"\.\.\.", inner)]
    first, last = inner, None
    for cut in cut_points:
        a, b = inner[:cut], inner[cut + 3:]
        if not known or (a in known and b in known):
            first, last = a, b
            break
    else:
        if cut_points:
            first, last = inner[: cut_points[0]], inner[cut_points[0] + 3:]
    if last is None:
        return [first]
    if order:
        position = {name: i for i, name in enumerate(order)}
        if first in position and last in position and position[first] <= position[last]:
            return list(order[position[first]: position[last] + 1])
    return [first, last]


def map_layer_name(
    name: str,
    onnx_nodes: Collection[str] | None = None,
    node_order: Sequence[str] | None = None,
    metadata: str | None = None,
) -> tuple[list[str], list[str]]:
    """Map one TensorRT layer to ONNX node names.

    Args:
        name: the TensorRT layer name (a profile suffix is removed).
        onnx_nodes: the known ONNX node names; without them tokens are returned cleaned but
            unverified.
        node_order: ONNX nodes in graph order, to expand Myelin ``{ForeignNode[a...b]}`` ranges.
        metadata: the layer's ``Metadata`` field; when it names ONNX layers it wins.

    Returns:
        ``(matched, unmatched)``: ONNX node names, and tokens that could not be matched
        (TensorRT-internal layers such as reformats land here).
    """
    from_metadata = metadata_onnx_nodes(metadata)
    if from_metadata:
        if onnx_nodes is None:
            return from_metadata, []
        return ([n for n in from_metadata if n in onnx_nodes],
                [n for n in from_metadata if n not in onnx_nodes])
    name, _ = _split_profile(name.strip())
    if name.startswith(_NOT_ONNX):
        # Reformat / unnamed / Myelin-internal layers: their names may *mention* a node
        # ("Reformatting CopyNode for Input Tensor 0 to Conv_0") but they do not compute it.
        return [], [name]
    known = onnx_nodes if onnx_nodes is not None else ()
    by_length = sorted(known, key=len, reverse=True)
    matched: list[str] = []
    unmatched: list[str] = []

    def add(items: Iterable[str], target: list[str]) -> None:
        for item in items:
            if item not in target:
                target.append(item)

    for token in _tokens(name):
        foreign = _FOREIGN.match(token)
        if foreign:
            span = _foreign_range(foreign.group(1), known, node_order)
            if onnx_nodes is None:
                add(span, matched)
            else:
                add([s for s in span if s in known], matched)
                add([s for s in span if s not in known], unmatched)
            continue
        if onnx_nodes is None:
            if token.startswith(_NOT_ONNX):
                add([token], unmatched)
            else:
                add([_strip_suffixes(token)], matched)
            continue
        hit = _match_token(token, known, by_length)
        add([hit] if hit else [token], matched if hit else unmatched)
    return matched, unmatched


# ----------------------------------------------------------------------------- the table


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
            matched = matched + [_strip_suffixes(m) for m in missing if not m.startswith(_NOT_ONNX)]
            missing = [m for m in missing if m.startswith(_NOT_ONNX)]
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
