"""Stage ``write``: stage the sparse model under a temporary name (``io/outputs.py`` commits it
only once the check passed)."""

from __future__ import annotations

from mpcompile.io.model_io import EXTERNAL_DATA_THRESHOLD
from mpcompile.stages.state import CompileState

__all__ = ["WriteStage"]


class WriteStage:
    name = "write"
    timing = "write"

    def applies(self, state: CompileState) -> bool:
        return True

    def run(self, state: CompileState) -> None:
        model = state.model
        weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
        external = state.input_external or weights > EXTERNAL_DATA_THRESHOLD
        state.staged = state.files.save_model(model, state.out_path, external_data=external)
        state.output_files = state.files.files(state.out_path)
