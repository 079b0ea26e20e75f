"""Engine-inspector JSON → per-layer records (what TensorRT built, layer by layer).

Why our own parser: the inspector's JSON is the only place that says which tactic each layer
runs and whether its weights were taken as sparse, and Polygraphy exposes it only as text in
``polygraphy inspect model``. This module parses the whole-engine JSON of
``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)`` (what our builder writes
beside the engine, and what ``trtexec --exportLayerInfo`` writes)::

    {"Layers": [{"Name": "Conv_0 + Relu_1", "LayerType": "CaskConvolution",
                 "ParameterType": "Convolution", "Inputs": [...], "Outputs": [...],
                 "HasSparseWeights": 1, "TacticName": "sm80_xmma_fprop_sparse_conv_...",
                 "Metadata": "[ONNX Layer: Conv_0]\\x1f[ONNX Layer: Relu_1]", ...}, ...],
     "Bindings": ["input", "output"]}

At ``ProfilingVerbosity.DETAILED`` each layer is a dict; at ``LAYER_NAMES_ONLY`` (the default,
TensorRT#4020) ``Layers`` is a list of names — parsed too, flagged ``detailed=False``. Engines
with several optimisation profiles repeat every layer with a `` [profile N]`` suffix; profile 0
is kept by default (as TensorRT Engine Explorer does). TensorRT ≤ 8.5 names the sparse-weights
field ``AllowSparse``; TensorRT 11 splits ``Format/Datatype`` into ``Datatype`` and ``Format``.

Tying layers to ONNX nodes is :mod:`mpcompile.trt.layer_map`; the per-node verdict table is
:mod:`mpcompile.trt.sparsity` (both re-exported here).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mpcompile.errors import MpcompileError, UsageError
from mpcompile.trt.layer_map import map_layer_name, metadata_onnx_nodes, split_profile

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


def _tensor(raw: Any) -> TrtTensor:
    if not isinstance(raw, Mapping):
        return TrtTensor(name=str(raw))
    dims = raw.get("Dimensions") or []
    return TrtTensor(
        name=str(raw.get("Name", "")),
        dimensions=[int(d) for d in dims] if isinstance(dims, list) else [],
        # TensorRT 11 splits "Format/Datatype" into "Datatype" and "Format"
        format=raw.get("Format/Datatype")
        or " ".join(str(raw[k]) for k in ("Datatype", "Format") if raw.get(k)) or None,
        location=raw.get("Location"),
    )


def _as_bool(value: Any) -> bool | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def _layer(raw: Mapping[str, Any]) -> TrtLayer:
    name, profile = split_profile(str(raw.get("Name", "")))
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
        name, bprofile = split_profile(str(binding))
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


# Re-exported so ``from mpcompile.trt.inspector import sparsity_table`` keeps working.
from mpcompile.trt.sparsity import GEMM_OPS, NodeSparsity, SparsityTable, onnx_node_index, sparsity_table  # noqa: E402
