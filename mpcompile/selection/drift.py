"""The measured choice: rank candidates by the output drift each causes, fit ``--max-drift``.

Why measured after masking: the MP rank predicts which layers tolerate 2:4; these measure
it, with the masks already computed, so each probe only swaps weights between their dense
and sparse versions and costs one ONNX Runtime pass.
"""

from __future__ import annotations

from mpcompile.io.calibration import CalibrationData
from mpcompile.io.runner import run_model
from mpcompile.checks.validate import relative_drift
from mpcompile.passes.gemm_discovery import GemmLayer
from mpcompile.passes.sparsify_24 import LayerMask, restore_dense, write_matrix
from mpcompile.selection.orders import Selection, rank_by_measurement

__all__ = ["rank_by_drift", "fit_drift_budget", "weight_groups"]


def weight_groups(selected: list[GemmLayer], masks: list[LayerMask]) -> dict[str, list[GemmLayer]]:
    """Layers sharing each mask's weight (a mask is named after the first of them)."""
    by_name = {layer.name: layer for layer in selected}
    return {m.layer: [layer for layer in selected if layer.weight.root is by_name[m.layer].weight.root] for m in masks}


def rank_by_drift(model, dense_out, sample: CalibrationData, selected, masks, selection: Selection, *,
                  target: float, batch_size: int, progress) -> list[LayerMask]:
    """``--order drift``: make each candidate sparse alone, measure the output drift, keep the
    cheapest per MAC up to ``target``.

    It sees each layer alone, not their interaction, which is what ``--max-drift`` (run over
    this order) then accounts for.
    """
    groups = weight_groups(selected, masks)
    for mask in masks:
        write_matrix(groups[mask.layer][0], mask.dense)
    cost: dict[str, float] = {}
    with progress("drift per layer", len(masks)) as advance:
        for mask in masks:
            write_matrix(groups[mask.layer][0], mask.sparse)
            cost[mask.layer] = relative_drift(dense_out, run_model(model, sample, batch_size)[0])
            write_matrix(groups[mask.layer][0], mask.dense)
            advance(mask.layer)
    kept = rank_by_measurement(selection, cost, target, {k: [layer.name for layer in v] for k, v in groups.items()})
    by_layer = {m.layer: m for m in masks}
    for mask in masks:
        if mask.layer in kept:
            write_matrix(groups[mask.layer][0], mask.sparse)
        else:
            restore_dense(groups[mask.layer], mask.dense)
    return [by_layer[name] for name in kept]


def fit_drift_budget(model, dense_out, selected, masks, selection: Selection, data: CalibrationData, *,
                     max_drift: float, batch_size: int, notes: list[str]) -> list[LayerMask]:
    """Largest prefix of the ranked layers whose output drift stays within ``max_drift``.

    Masks were computed once for every candidate, so the search costs ~log2(L) ONNX
    Runtime passes.
    """
    by_name = {layer.name: layer for layer in selected}
    ranked = [m for name in selection.ranked_selected for m in masks if m.layer == name]
    groups = weight_groups(selected, ranked)

    def drift_with(count: int) -> float:
        for index, mask in enumerate(ranked):
            write_matrix(by_name[mask.layer], mask.sparse if index < count else mask.dense)
        return relative_drift(dense_out, run_model(model, data, batch_size)[0])

    lo, hi = 0, len(ranked)  # invariant: drift(lo) <= budget (lo = 0 is dense)
    if drift_with(hi) <= max_drift:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if drift_with(mid) <= max_drift:
            lo = mid
        else:
            hi = mid
    kept = ranked[:lo]
    for index, mask in enumerate(ranked):
        if index < lo:
            write_matrix(by_name[mask.layer], mask.sparse)
        else:
            restore_dense(groups[mask.layer], mask.dense)
    dropped = {layer.name for mask in ranked[lo:] for layer in groups[mask.layer]}
    for decision in selection.decisions:
        if decision.name in dropped:
            decision.sparse = False
            decision.reason = f"kept dense: adding it exceeds --max-drift {max_drift}"
    selection.selected_macs = sum(d.macs for d in selection.decisions if d.sparse)
    notes.append(f"--max-drift {max_drift}: {lo} of {len(ranked)} ranked weights made 2:4 "
                 f"(relative L2 drift on calibration data)")
    return kept
