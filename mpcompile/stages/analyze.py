"""Stage ``analyze``: the MP spectral fit of every eligible GEMM (``mpcompile.analyze``)."""

from __future__ import annotations

from mpcompile.analyze import analyze_loaded, weights_to_analyze
from mpcompile.checks.user_checks import check_layer_names
from mpcompile.stages.state import CompileState

__all__ = ["AnalyzeStage"]


class AnalyzeStage:
    name = "analyze"
    timing = "analyze"

    def applies(self, state: CompileState) -> bool:
        return True

    def run(self, state: CompileState) -> None:
        with state.progress("MP fit", weights_to_analyze(state.loaded)) as advance:
            state.analysis = analyze_loaded(state.loaded, state.spec, state.options.analyze, advance)
        check_layer_names("--exclude", state.options.exclude, [a.name for a in state.analysis.result.layers])
