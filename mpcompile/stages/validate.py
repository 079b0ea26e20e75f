"""Stage ``validate``: the sparse model's outputs against the dense reference, in ONNX Runtime."""

from __future__ import annotations

from mpcompile.checks.validate import compare_all_outputs
from mpcompile.io.runner import run_model
from mpcompile.lazy_weights import release_all
from mpcompile.stages.state import CompileState
from mpcompile.stages.streaming import end_to_end_skipped

__all__ = ["ValidateStage"]


class ValidateStage:
    name = "validate"
    timing = "validate"

    def applies(self, state: CompileState) -> bool:
        return True

    def run(self, state: CompileState) -> None:
        model = state.model
        skipped = end_to_end_skipped(state)
        if skipped is not None or state.dense_eval_all is None:
            state.notes.append(skipped or "end-to-end ONNX Runtime validation skipped: no dense reference outputs")
            return
        sparse_all = run_model(model, state.eval_data, state.options.batch_size)
        release_all(model)
        names = [v.name for v in model.graph.outputs]
        state.validation = compare_all_outputs(names, state.dense_eval_all, sparse_all, state.eval_data.used_labels)
        if all(c.degenerate for c in state.validation.all_outputs):
            state.notes.append("validation not meaningful: the dense outputs are degenerate on this data ("
                               + "; ".join(f"'{c.output}': {c.degenerate}" for c in state.validation.all_outputs)
                               + "); pass real inputs with --eval-data or --calib")
        # an export stuck at batch 1 was run one sample at a time: said once, whichever data saw it
        state.notes.extend(dict.fromkeys(d.batch_fallback for d in (state.data, state.eval_data)
                                         if d is not None and d.batch_fallback))
