"""One compile's state and the protocol its stages follow.

Why a state object and not one long function: every stage reads what earlier stages
learned (the loaded model, the analysis, the selection, the calibration statistics, the
masks) and adds its own; with that written down as fields, a stage is a small module with
one job, testable on a hand-built state, and the compile is a list (``pipeline.py``).

Why a *scope*: the layer-wise stages (calibrate, permute, mask) work on
``state.layers_in_scope()`` — every selected layer by default — and merge what they learn
into the state instead of replacing it. Running that group once per subset of layers,
``run_stages(LAYER_STAGES, state, layers=chunk)``, is then sequential calibration: each
chunk is captured on the model the earlier chunks already made sparse. Graph-wide stages
ignore the scope.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import onnx_ir as ir

from mpcompile.stages.options import CompileOptions, ProgressFactory, no_progress

__all__ = ["CompileState", "PermutationRecord", "Stage", "run_stages"]


@dataclass
class PermutationRecord:
    layers: list[str]
    folded: bool
    reason: str
    efficacy: float | None = None
    kept_before: float | None = None
    kept_after: float | None = None
    gather_inserted: bool = False


@dataclass
class CompileState:
    """The onnx_ir model plus what the stages so far learned about it.

    Fields are filled in stage order (the comment names the stage that sets each); a stage
    may only read fields of stages before it.
    """

    path: str | os.PathLike
    options: CompileOptions
    files: Any  # RunOutputs: where outputs are staged (the caller commits)
    progress: ProgressFactory = no_progress
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)
    # load
    loaded: Any = None  # LoadedModel
    out_path: Path | None = None
    input_external: bool = False
    data: Any = None  # CalibrationData
    from_user: bool = False
    spec: Any = None  # ShapeSpec of the analysis
    # analyze
    analysis: Any = None  # Analysis
    # reference (dense outputs before any rewrite)
    eval_data: Any = None
    eval_source: str | None = None
    method: str = ""
    unstructured: bool = False
    from_capture: bool = False
    measured_order: bool = False
    order: str = "mp"  # --order, resolved (stages/choice.py: resolve_order)
    dense_eval_all: list[np.ndarray] | None = None
    dense_calib_out: np.ndarray | None = None
    drift_sample: Any = None
    dense_sample_out: np.ndarray | None = None
    # select
    selection: Any = None  # Selection
    selected: list = field(default_factory=list)  # GemmLayer, graph order
    # layer stages (merge per scope)
    scope: list | None = None
    stats_by_node: dict[ir.Node, Any] = field(default_factory=dict)  # LayerStats
    calibration_protocol: str | None = None  # sequential / dense (None: no data method)
    capture_passes: int = 0  # ONNX Runtime capture passes the calibrate stage ran
    permutations: list[PermutationRecord] = field(default_factory=list)
    precomputed: dict[str, Any] = field(default_factory=dict)  # PackedMaskResult the judge computed
    masks: list = field(default_factory=list)  # LayerMask
    spectra: dict[str, dict[str, float | int]] = field(default_factory=dict)
    spill: Any = None  # SpillFile of the masked weights when the compile streams
    # write / check / validate / speedup
    staged: Path | None = None
    output_files: list = field(default_factory=list)
    check: Any = None  # CheckReport
    validation: Any = None  # OutputComparison
    speedup: list[dict[str, Any]] = field(default_factory=list)

    @property
    def model(self) -> ir.Model:
        return self.loaded.model

    @property
    def dense_eval_out(self) -> np.ndarray | None:
        return None if self.dense_eval_all is None else self.dense_eval_all[0]

    def layers_in_scope(self) -> list:
        """The selected layers the layer-wise stages work on now (all of them by default)."""
        if self.scope is None:
            return list(self.selected)
        nodes = {layer.node for layer in self.scope}
        return [layer for layer in self.selected if layer.node in nodes]

    def replace_layers(self, rediscovered: dict[ir.Node, Any]) -> None:
        """Point selected (and scoped) layers at freshly discovered ones (folds add initializers)."""
        self.selected = [rediscovered[layer.node] for layer in self.selected]
        if self.scope is not None:
            self.scope = [rediscovered.get(layer.node, layer) for layer in self.scope]


@runtime_checkable
class Stage(Protocol):
    """One step of the compile. ``timing``: the ``seconds`` key its wall time adds to (None: untimed)."""

    name: str
    timing: str | None

    def applies(self, state: CompileState) -> bool:
        """False: the options make this stage a no-op (it then takes no time either)."""

    def run(self, state: CompileState) -> None:
        """Read earlier fields of ``state`` and set this stage's."""


def run_stages(stages: Sequence[Stage], state: CompileState, layers: Iterable | None = None) -> CompileState:
    """Run ``stages`` in order, each timed; with ``layers``, the layer-wise ones see only those.

    Like onnx_ir's ``PassManager`` over passes, but over a typed state instead of a model:
    stages that are pure graph rewrites use ``onnx_ir.passes`` inside (see ``lower.py``).
    """
    previous = state.scope
    if layers is not None:
        state.scope = list(layers)
    try:
        for stage in stages:
            if not stage.applies(state):
                continue
            start = time.perf_counter()
            stage.run(state)
            if stage.timing is not None:
                state.timings[stage.timing] = state.timings.get(stage.timing, 0.0) + time.perf_counter() - start
    finally:
        state.scope = previous
    return state
