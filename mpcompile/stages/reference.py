"""Stage ``reference``: the mask method, the evaluation data and the dense model's outputs.

Why before any rewrite: every later figure (validation, drift order, drift budget) is a
distance to the dense outputs, and computing them now is cheaper than keeping a copy of
the model. When calibration runs over the evaluation data, its capture pass gives them
instead (``from_capture``), so no ONNX Runtime pass is spent here for them.
"""

from __future__ import annotations

from mpcompile.checks.model_checks import dense_model_errors, require_finite, require_finite_inputs
from mpcompile.errors import UsageError
from mpcompile.io.calibration import CalibrationData, load_calibration
from mpcompile.io.runner import run_model
from mpcompile.lazy_weights import release_all
from mpcompile.numerics.masks import MASK_METHODS
from mpcompile.passes.unstructured_prune import UNSTRUCTURED_METHODS
from mpcompile.selection.orders import MEASURED_ORDERS
from mpcompile.stages.choice import resolve_order
from mpcompile.stages.options import DATA_METHODS, CompileOptions
from mpcompile.stages.state import CompileState
from mpcompile.stages.streaming import end_to_end_skipped

__all__ = ["ReferenceStage", "resolve_method", "DRIFT_ORDER_SAMPLES"]

DRIFT_ORDER_SAMPLES = 64


def resolve_method(options: CompileOptions, has_data: bool) -> str:
    method = options.method or ("cast-obs" if has_data else "magnitude")
    if method not in MASK_METHODS and method not in UNSTRUCTURED_METHODS:
        raise UsageError(
            f"--method must be one of {sorted([*MASK_METHODS, *UNSTRUCTURED_METHODS])}, got {method!r}"
        )
    return method


def subset(data: CalibrationData, samples: int) -> CalibrationData:
    """The first ``samples`` samples (whole static batches): enough to rank layers by drift."""
    count = min(data.samples, max(samples, data.static_batch or 0))
    labels = data.labels[:count] if data.labels is not None else None
    return CalibrationData(data.slice(0, count), data.source, labels, data.static_batch, data.shared)


class ReferenceStage:
    name = "reference"
    timing = "validate"

    def applies(self, state: CompileState) -> bool:
        return True

    def run(self, state: CompileState) -> None:
        opts, data, model = state.options, state.data, state.model
        state.eval_data, state.eval_source = data, data.source
        if opts.eval_data:
            state.eval_data = load_calibration(opts.eval_data, model)
            state.eval_source = f"file:{opts.eval_data}"
            require_finite_inputs(state.eval_data)
        state.method = resolve_method(opts, state.from_user or opts.method in DATA_METHODS)
        state.unstructured = state.method in UNSTRUCTURED_METHODS
        state.from_capture = state.eval_data is data and state.method in DATA_METHODS and not state.unstructured
        state.order = resolve_order(opts)
        state.measured_order = state.order in MEASURED_ORDERS
        skipped = end_to_end_skipped(state)
        with dense_model_errors():
            if not state.from_capture and skipped is None:
                state.dense_eval_all = run_model(model, state.eval_data, opts.batch_size)
                release_all(model)  # the session mapped every lazily read weight: unmap them
            dense_eval_out = state.dense_eval_out
            state.dense_calib_out = (
                dense_eval_out if state.eval_data is data
                else run_model(model, data, opts.batch_size)[0] if opts.max_drift is not None else None
            )
            state.drift_sample = subset(data, DRIFT_ORDER_SAMPLES) if state.measured_order else None
            state.dense_sample_out = (run_model(model, state.drift_sample, opts.batch_size)[0]
                                      if state.drift_sample is not None else None)
        if state.dense_eval_out is not None:
            require_finite(state.dense_eval_out, f"the input model's output on {state.eval_source}")
        if not state.from_user:
            state.notes.append(f"no --calib given: calibration and validation use {data.source}")
        elif state.eval_data is data:
            state.notes.append("no --eval-data given: validation reuses the calibration set, so its figures are "
                               "on data the masks were fitted to")
