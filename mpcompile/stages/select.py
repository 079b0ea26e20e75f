"""Stage ``select``: which eligible layers become candidates for 2:4 (``mpcompile.selection``).

A measured order (``--order drift``) or ``--max-drift`` takes every candidate here and
trims later, once masks exist to measure (``stages/measured.py``).
"""

from __future__ import annotations

from mpcompile.errors import UnsupportedModelError, UsageError
from mpcompile.selection.orders import MEASURED_ORDERS, select_layers
from mpcompile.selection.profitable import explain_unprofitable, unprofitable
from mpcompile.stages.state import CompileState

__all__ = ["SelectStage"]


class SelectStage:
    name = "select"
    timing = None

    def applies(self, state: CompileState) -> bool:
        return True

    def run(self, state: CompileState) -> None:
        opts, analysis = state.options, state.analysis
        target = 1.0 if opts.max_drift is not None or state.measured_order else opts.target
        kept_dense = unprofitable(analysis, opts.only_profitable)
        if opts.only_profitable:
            state.notes.append(f"--only-profitable {opts.only_profitable}: {len(kept_dense)} eligible layers kept "
                               "dense, predicted to run dense in TensorRT there (modeled, see each layer's reason)")
        selection = select_layers(analysis.result, target=target, order=state.order,
                                  exclude=set(opts.exclude) | set(kept_dense))
        explain_unprofitable(selection, kept_dense, opts.exclude, opts.only_profitable)
        if not selection.selected_names and opts.target > 0:
            if kept_dense:
                raise UnsupportedModelError(f"no layer is predicted to run sparse on {opts.only_profitable} "
                                            f"({len(kept_dense)} eligible, all too small or memory bound); "
                                            "drop --only-profitable to prune anyway")
            raise UnsupportedModelError("no layer is eligible for 2:4 (see `mpcompile analyze` for the reasons)")
        state.selection = selection
        chosen = set(selection.selected_names)
        state.selected = [a.layer for a in analysis.result.layers if a.name in chosen]
        if state.unstructured and (opts.max_drift is not None or opts.conv == "im2col" or state.measured_order):
            raise UsageError(f"--method {state.method} is unstructured: --max-drift, --order "
                             f"{' '.join(MEASURED_ORDERS)} and --conv im2col apply to 2:4 only")
