"""Stage ``calibrate`` (layer-wise): per-layer input statistics from the calibration data.

Statistics only matter to data-aware masks (and to judging permutations under them);
magnitude permutations score |W| alone, so no capture pass is spent for them. Run over a
scope, it captures those layers on the model as it is now: after earlier chunks were
masked, that is sequential calibration.
"""

from __future__ import annotations

import numpy as np

from mpcompile.checks.model_checks import dense_model_errors, require_finite
from mpcompile.io.capture import capture_layer_stats
from mpcompile.stages.options import DATA_METHODS
from mpcompile.stages.state import CompileState

__all__ = ["CalibrateStage"]


class CalibrateStage:
    name = "calibrate"
    timing = "calibrate"

    def applies(self, state: CompileState) -> bool:
        return True  # timed (0 s) even when skipped, as the report always listed it

    def run(self, state: CompileState) -> None:
        if state.unstructured or state.method not in DATA_METHODS:
            return
        opts, layers = state.options, state.layers_in_scope()
        # The dense outputs come with the first capture, while the model is still dense.
        want_outputs = state.from_capture and state.dense_eval_all is None
        if not layers and not want_outputs:
            return
        state.capture_passes += 1
        with state.progress("calibration", len(layers)) as advance:
            outputs: list[np.ndarray] = []
            with dense_model_errors():
                captured = capture_layer_stats(state.model, layers, state.data, batch_size=min(opts.batch_size, 8),
                                               seed=opts.seed, progress=advance,
                                               graph_outputs=outputs if want_outputs else None)
        state.stats_by_node.update({layer.node: captured.pop(layer.name) for layer in layers if layer.name in captured})
        uncaptured = [layer.name for layer in layers if layer.node not in state.stats_by_node]
        if uncaptured:
            state.notes.append(
                f"{len(uncaptured)} layer(s) inside If/Loop/Scan bodies read a value computed in the "
                "body, which ONNX Runtime cannot expose: they got data-free magnitude 2:4 masks "
                f"(calibrated: false): {', '.join(uncaptured)}")
        if want_outputs:
            state.dense_eval_all = outputs
            state.dense_calib_out = outputs[0]
            require_finite(outputs[0], f"the input model's output on {state.eval_source}")
