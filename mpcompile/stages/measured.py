"""Stages ``drift_order`` and ``drift_budget``: the measured choice (``selection/drift.py``).

They run once every candidate is masked and trim ``state.masks`` to the layers kept.
"""

from __future__ import annotations

from mpcompile.selection.drift import fit_drift_budget, rank_by_drift
from mpcompile.stages.state import CompileState

__all__ = ["DriftOrderStage", "DriftBudgetStage"]


class DriftOrderStage:
    name = "drift_order"
    timing = "drift_order"

    def applies(self, state: CompileState) -> bool:
        return state.order == "drift"

    def run(self, state: CompileState) -> None:
        opts = state.options
        target = 1.0 if opts.max_drift is not None else opts.target
        state.masks = rank_by_drift(state.model, state.dense_sample_out, state.drift_sample, state.selected,
                                    state.masks, state.selection, target=target, batch_size=opts.batch_size,
                                    progress=state.progress)
        state.notes.append(f"--order {state.order}: layers ranked by the relative output drift each causes alone on "
                           f"{state.drift_sample.samples} samples of {state.data.source}, per MAC")


class DriftBudgetStage:
    name = "drift_budget"
    timing = "drift_search"

    def applies(self, state: CompileState) -> bool:
        return state.options.max_drift is not None and state.order != "choice"

    def run(self, state: CompileState) -> None:
        opts = state.options
        state.masks = fit_drift_budget(state.model, state.dense_calib_out, state.selected, state.masks,
                                       state.selection, state.data, max_drift=opts.max_drift,
                                       batch_size=opts.batch_size, notes=state.notes)
