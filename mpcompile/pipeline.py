"""The compile: a short list of named stages over one :class:`~mpcompile.stages.state.CompileState`.

Each stage is a module under ``mpcompile/stages/`` with one job (the README's pipeline
table maps each to its module); this module only lists them and owns the run's outputs.
The layer-wise group (calibrate → permute → mask) can be re-run over subsets of layers
(``run_stages(LAYER_STAGES, state, layers=chunk)``): sequential calibration (the default,
``stages/sequential.py``) is a loop over that group by depth, not another pipeline.
"""

from __future__ import annotations

import os
import time

from mpcompile.io.outputs import RunOutputs
from mpcompile.stages.analyze import AnalyzeStage
from mpcompile.stages.calibrate import CalibrateStage
from mpcompile.stages.check import CheckStage
from mpcompile.stages.choice import ChoiceStage
from mpcompile.stages.load import LoadStage, check_options
from mpcompile.stages.lower import LowerStage
from mpcompile.stages.mask import MaskStage
from mpcompile.stages.measured import DriftBudgetStage, DriftOrderStage
from mpcompile.stages.options import DATA_METHODS, CompileOptions, ProgressFactory, no_progress
from mpcompile.stages.permute import PermuteStage
from mpcompile.stages.reference import ReferenceStage
from mpcompile.stages.result import CompileResult, result_of
from mpcompile.stages.select import SelectStage
from mpcompile.stages.sequential import run_layer_stages
from mpcompile.stages.spectra import SpectraStage
from mpcompile.stages.speedup import SpeedupStage
from mpcompile.stages.state import CompileState, PermutationRecord, Stage, run_stages
from mpcompile.stages.validate import ValidateStage
from mpcompile.stages.write import WriteStage

__all__ = ["CompileOptions", "CompileResult", "ProgressFactory", "compile_model", "PermutationRecord",
           "DATA_METHODS", "FRONT_STAGES", "LAYER_STAGES", "BACK_STAGES", "REPORT_STAGES", "COMPILE_STAGES"]

FRONT_STAGES: tuple[Stage, ...] = (LoadStage(), AnalyzeStage(), ReferenceStage(), SelectStage())
"""Read the model and data, fit the spectra, take the dense reference, choose candidates."""
LAYER_STAGES: tuple[Stage, ...] = (CalibrateStage(), PermuteStage(), MaskStage())
"""Layer-wise: each works on ``state.layers_in_scope()`` and merges into the state."""
BACK_STAGES: tuple[Stage, ...] = (DriftOrderStage(), DriftBudgetStage(), ChoiceStage(), LowerStage(), SpectraStage(),
                                  WriteStage(), CheckStage(), ValidateStage())
"""The measured choice, graph lowering, then write, check and validate the file."""
REPORT_STAGES: tuple[Stage, ...] = (SpeedupStage(),)
"""After the clock stops: what the report adds (not part of ``seconds.total``)."""
COMPILE_STAGES: tuple[Stage, ...] = FRONT_STAGES + LAYER_STAGES + BACK_STAGES


def compile_model(
    path: str | os.PathLike,
    options: CompileOptions | None = None,
    progress: ProgressFactory = no_progress,
    outputs: RunOutputs | None = None,
) -> CompileResult:
    """Run the whole pipeline on ``path`` and write the sparse model (never over the input).

    The model is staged, checked and validated before it takes its final name, and only when
    the independent check passes (``result.committed``). A caller passing ``outputs`` (the CLI,
    which adds its reports to the same run) commits them itself.
    """
    opts = options or CompileOptions()
    if outputs is not None:
        return _compile_into(path, opts, progress, outputs)
    with RunOutputs([path], force=opts.force) as own:
        result = _compile_into(path, opts, progress, own)
        if result.committed:
            own.commit()
        return result


def _compile_into(path: str | os.PathLike, opts: CompileOptions, progress: ProgressFactory,
                  files: RunOutputs) -> CompileResult:
    """The pipeline, writing into ``files`` (staged; the caller commits)."""
    check_options(opts)
    state = CompileState(path, opts, files, progress)
    run_stages(FRONT_STAGES, state)
    run_layer_stages(LAYER_STAGES, state)  # once, or once per depth group (--calibration sequential)
    run_stages(BACK_STAGES, state)
    state.timings["total"] = time.perf_counter() - state.t0
    run_stages(REPORT_STAGES, state)
    return result_of(state)
