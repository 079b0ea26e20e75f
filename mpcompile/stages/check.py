"""Stage ``check``: the independent 2:4 checker re-reads the written file (``checks/checker.py``)."""

from __future__ import annotations

from mpcompile.stages.state import CompileState

__all__ = ["CheckStage"]


class CheckStage:
    name = "check"
    timing = "check"

    def applies(self, state: CompileState) -> bool:
        return True

    def run(self, state: CompileState) -> None:
        from mpcompile.checks.checker import check_model

        state.check = check_model(state.staged)
        state.check.path = str(state.out_path)
