"""Give dense weights back to pruned layers of a compiled model (pure ONNX, no TensorRT).

Why: TensorRT may run a pruned layer with a dense kernel anyway; that layer then loses accuracy
for no speed, so ``mpcompile build`` gives it its dense weight back. Copying the dense
initializer by name is wrong in three ways the compile makes likely:

- a folded channel permutation left the producer's rows, its bias and every per-channel
  constant between permuted, so the dense weight must be written *in the permuted frame*
  (columns by the layer's recorded input order, rows by its recorded output order);
- an ``--fp16`` model stores FP16 weights, so the dense weight is cast to the stored dtype;
- a weight reached through Transpose/Cast chains is stored in another layout, so it is
  written through the same layout logic discovery reads it with (``write_matrix``).

Nothing is written unless ONNX Runtime agrees: a copy with *every* pruned layer reverted must
reproduce the dense model's outputs (to float rounding), which proves the frame, dtype and
layout of every layer, and the model actually reverted must run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from mpcompile.errors import EXIT_BAD_INPUT, MpcompileError
from mpcompile.passes.gemm_discovery import GemmLayer, discover_gemms
from mpcompile.passes.permute_channels import INPUT_ORDER_KEY, OUTPUT_ORDER_KEY, PERMUTATION_KEY
from mpcompile.passes.sparsify_24 import SPARSITY_KEY, restore_dense

__all__ = ["RevertError", "RevertResult", "revert_dense_weights", "revert_model", "REVERT_TOLERANCE"]

# Relative L2 output drift allowed between the all-reverted copy and the dense model: float
# summation-order noise in FP32, weight rounding in FP16/BF16. A wrong frame gives O(1).
REVERT_TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
_LOWERED_KEY = "mpcompile.lowered_from"


class RevertError(MpcompileError):
    """The dense weights cannot be given back faithfully (the model is left untouched)."""

    exit_code = EXIT_BAD_INPUT


@dataclass
class RevertResult:
    """What was given back and what ONNX Runtime said about it.

    Attributes:
        layers: layers whose dense weight was restored (a shared weight brings its readers).
        check_drift: output drift vs dense of a copy with every pruned layer reverted (must be
            within ``tolerance``: it proves the permuted frame, dtype and layout).
        sparse_drift, drift: output drift vs dense of the input model and of the reverted one.
        precision: "float16" when the model stores reduced-precision weights, else "float32".
    """

    layers: list[str]
    check_drift: float
    tolerance: float
    sparse_drift: float
    drift: float
    precision: str
    model: ir.Model | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "model"}


def _order(node: ir.Node, key: str) -> np.ndarray | None:
    text = node.metadata_props.get(key)
    return None if not text else np.array([int(v) for v in text.split(",")], dtype=np.int64)


def _k_order(layer: GemmLayer, perm: np.ndarray) -> np.ndarray:
    """Lift a Cin order to the ``[out, K]`` matrix's K axis, ``(kh, kw, Cin)`` for a Conv."""
    positions = layer.reduction // layer.in_channels
    return (np.arange(positions)[:, None] * layer.in_channels + perm[None, :]).ravel()


def _permuted_dense(sparse: GemmLayer, dense: GemmLayer) -> np.ndarray:
    """The dense ``[out, K]`` matrix in the sparse model's channel frame."""
    matrix = dense.matrix()
    if matrix.shape != (sparse.out_features, sparse.reduction):
        raise RevertError(f"layer '{sparse.name}': dense weight is {matrix.shape[0]}x{matrix.shape[1]}, "
                          f"the sparse model's is {sparse.out_features}x{sparse.reduction}; not the same model")
    cols = _order(sparse.node, INPUT_ORDER_KEY)
    if cols is None and sparse.node.metadata_props.get(PERMUTATION_KEY):
        raise RevertError(f"layer '{sparse.name}' was permuted but its channel order is not recorded "
                          "(compiled by an older mpcompile); recompile to revert it")
    if cols is not None:
        if cols.size != sparse.in_channels:
            raise RevertError(f"layer '{sparse.name}': recorded order has {cols.size} channels, "
                              f"layer has {sparse.in_channels}")
        matrix = matrix[:, _k_order(sparse, cols)]
    rows = _order(sparse.node, OUTPUT_ORDER_KEY)
    if rows is not None:
        if rows.size != sparse.out_features:
            raise RevertError(f"layer '{sparse.name}': recorded output order has {rows.size} channels, "
                              f"layer has {sparse.out_features}")
        matrix = matrix[rows]
    return matrix


def _dense_name(layer: GemmLayer) -> str:
    lowered = layer.node.metadata_props.get(_LOWERED_KEY, "")
    return lowered.split(":", 1)[1] if ":" in lowered else (layer.node.name or layer.name)


def revert_model(sparse: ir.Model, dense: ir.Model, nodes: Iterable[str]) -> list[str]:
    """Write the dense weights of ``nodes`` (node or display names) into ``sparse``, in place.

    Returns the layers given back. Every layer reading a restored weight is included: a
    shared weight is one tensor. Raises RevertError on an unknown or unmatched layer.
    """
    wanted = set(nodes)
    layers = discover_gemms(sparse)
    dense_by_name = {}
    for layer in discover_gemms(dense):
        dense_by_name.setdefault(layer.node.name or layer.name, layer)
        dense_by_name.setdefault(layer.name, layer)
    targets = [layer for layer in layers if layer.name in wanted or layer.node.name in wanted]
    missing = wanted - {layer.name for layer in targets} - {layer.node.name for layer in targets}
    if missing:
        raise RevertError(f"layers not found in the sparse model: {', '.join(sorted(missing))}")
    groups: dict[int, list[GemmLayer]] = {}
    for layer in layers:
        groups.setdefault(id(layer.weight.root), []).append(layer)
    given: list[str] = []
    done: set[int] = set()
    for layer in targets:
        key = id(layer.weight.root)
        if key in done:
            continue
        done.add(key)
        ref = dense_by_name.get(_dense_name(layer))
        if ref is None:
            raise RevertError(f"layer '{layer.name}' has no counterpart named '{_dense_name(layer)}' "
                              "in the dense model")
        restore_dense(groups[key], _permuted_dense(layer, ref))
        given += [member.name for member in groups[key]]
    return given


def _pruned_nodes(model: ir.Model) -> list[str]:
    return [layer.name for layer in discover_gemms(model) if layer.node.metadata_props.get(SPARSITY_KEY)]


def _precision(model: ir.Model) -> str:
    reduced = {ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
    return "float16" if any(layer.weight.stored_tensor().dtype in reduced or any(
        n.op_type == "Cast" for n in layer.weight.chain) for layer in discover_gemms(model)) else "float32"


def _drift(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    from mpcompile.checks.validate import relative_drift

    return max(relative_drift(r, o) for r, o in zip(reference, outputs))


def revert_dense_weights(
    sparse_path: str | os.PathLike,
    dense_path: str | os.PathLike,
    nodes: Iterable[str],
    output: str | os.PathLike | None = None,
    *,
    data=None,
    spec=None,
) -> RevertResult:
    """Give ``nodes`` of the compiled model their dense weights back, validated, and write it.

    Args:
        data: CalibrationData to compare outputs on (default: 8 synthetic samples at ``spec``).
        output: where to write (default ``<sparse>.reverted.onnx``); None result.model only
            when ``output`` is the empty string.
    """
    from mpcompile.io.calibration import run_model, synthetic_inputs
    from mpcompile.io.model_io import load_model, save_model
    from mpcompile.io.shapes import ShapeSpec

    nodes = list(nodes)
    dense = load_model(dense_path).model
    if data is None:
        data = synthetic_inputs(dense, spec or ShapeSpec(), samples=8)
    try:
        reference = run_model(dense, data)
        check = load_model(sparse_path).model
        sparse_out = run_model(check, data)
        revert_model(check, dense, _pruned_nodes(check))
        check_drift = _drift(reference, run_model(check, data))
    except RevertError:
        raise
    except Exception as exc:  # ONNX Runtime rejects a broken rewrite with many error types
        raise RevertError(f"revert check failed in ONNX Runtime: {str(exc).splitlines()[0]}") from exc
    del check
    precision = _precision(load_model(sparse_path).model)
    tolerance = REVERT_TOLERANCE[precision]
    if not check_drift <= tolerance:
        raise RevertError(
            f"giving every pruned layer its dense weight back does not reproduce {Path(dense_path).name} "
            f"(relative drift {check_drift:.3g} > {tolerance:g}): not the dense original of this model, "
            "or weights other than the masks changed (fine-tuned?); pass --no-revert to keep the pruned weights")
    model = load_model(sparse_path).model
    given = revert_model(model, dense, nodes)
    try:
        drift = _drift(reference, run_model(model, data))
    except Exception as exc:
        raise RevertError(f"reverted model rejected by ONNX Runtime: {str(exc).splitlines()[0]}") from exc
    result = RevertResult(given, check_drift, tolerance, _drift(reference, sparse_out), drift, precision, model)
    if output != "":
        sparse_path = Path(sparse_path)
        out = Path(output) if output else sparse_path.with_name(sparse_path.stem + ".reverted.onnx")
        save_model(model, out, protect=(sparse_path, dense_path))
    return result
