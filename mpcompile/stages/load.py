"""Stage ``load``: check the options, read the model and the calibration (or synthetic) data.

Why first and alone: every user mistake the options or files can hold is refused here,
with a one-line error, before any second is spent on analysis.
"""

from __future__ import annotations

from pathlib import Path

from mpcompile.checks.model_checks import require_finite_inputs
from mpcompile.checks.user_checks import check_dim_names
from mpcompile.errors import UsageError
from mpcompile.io.calibration import load_calibration, shapes_from_calibration, synthetic_inputs
from mpcompile.io.model_io import default_output_path, load_model
from mpcompile.io.outputs import protected_files
from mpcompile.stages.choice import check_choice_options
from mpcompile.stages.options import CALIBRATION_PROTOCOLS, CompileOptions
from mpcompile.stages.state import CompileState

__all__ = ["LoadStage", "check_options"]


def check_options(opts: CompileOptions) -> None:
    if opts.conv not in ("native", "im2col"):
        raise UsageError(f"--conv must be 'native' or 'im2col', got {opts.conv!r}")
    if opts.perm_steps is not None and opts.perm_steps < 0:
        raise UsageError(f"--perm-steps must be >= 0, got {opts.perm_steps}")
    if opts.calibration not in CALIBRATION_PROTOCOLS:
        raise UsageError(f"--calibration must be one of {', '.join(CALIBRATION_PROTOCOLS)}, got {opts.calibration!r}")
    if opts.perm_time_budget < 0:
        raise UsageError(f"--perm-time must be >= 0 seconds, got {opts.perm_time_budget:g}")
    check_choice_options(opts)


class LoadStage:
    name = "load"
    timing = "analyze"  # reported together with the analysis, as it always was

    def applies(self, state: CompileState) -> bool:
        return True

    def run(self, state: CompileState) -> None:
        opts, files = state.options, state.files
        files.protect([state.path, opts.calib, opts.eval_data])
        out_path = Path(opts.output) if opts.output else default_output_path(Path(state.path).resolve(), "sparse")
        state.out_path = files.add(out_path, "-o")
        state.loaded = loaded = load_model(state.path)
        files.protect(protected_files(loaded.path, loaded.proto))
        state.input_external = any(t.data_location == 1 for t in loaded.proto.graph.initializer)
        check_dim_names(loaded.model, opts.shape_spec.dims)
        if opts.calib:
            state.data, state.from_user = load_calibration(opts.calib, loaded.model, limit=opts.calib_samples), True
        else:
            state.data = synthetic_inputs(loaded.model, opts.shape_spec, opts.synthetic_samples, opts.seed)
            state.from_user = False
        require_finite_inputs(state.data)
        # With --calib, dynamic dims (sequence length, image size) are those of the data.
        state.spec = (shapes_from_calibration(opts.shape_spec, loaded.model, state.data) if state.from_user
                      else opts.shape_spec)
