"""The stage protocol: the compile as composed stages, and the layer group re-run over subsets.

Runs on the bundled digits MLP (three Gemms, 8x8 digit images), so no export is needed.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest

from mpcompile.errors import UsageError
from mpcompile.io.outputs import RunOutputs
from mpcompile.pipeline import (
    BACK_STAGES,
    COMPILE_STAGES,
    FRONT_STAGES,
    LAYER_STAGES,
    CompileOptions,
    compile_model,
)
from mpcompile.stages.calibrate import CalibrateStage
from mpcompile.stages.lower import run_passes
from mpcompile.stages.state import CompileState, Stage, run_stages
from mpcompile.zoo.bundled import bundled_model_path, write_split_npz

MODEL = "digits_mlp"


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> str:
    return str(write_split_npz("calib", tmp_path_factory.mktemp("data") / "calib.npz", model=MODEL))


def _staged(opts: CompileOptions, chunks=None) -> dict:
    """Run the stages by hand; ``chunks(selected)`` splits the layer group's runs."""
    path = bundled_model_path(MODEL)
    with RunOutputs([path], force=True) as files:
        state = CompileState(path, opts, files)
        run_stages(FRONT_STAGES, state)
        for chunk in (chunks(state.selected) if chunks else [None]):
            run_stages(LAYER_STAGES, state, layers=chunk)
        run_stages(BACK_STAGES, state)
        return {"state": state, "sparse": {m.layer: m.sparse.copy() for m in state.masks},
                "dense": {m.layer: m.dense.copy() for m in state.masks},
                "validation": state.validation.to_dict(), "check_ok": state.check.ok}


def test_every_compile_stage_follows_the_protocol_in_pipeline_order():
    assert all(isinstance(stage, Stage) for stage in COMPILE_STAGES)
    assert [s.name for s in COMPILE_STAGES] == [
        "load", "analyze", "reference", "select", "calibrate", "permute", "mask",
        "drift_order", "drift_budget", "choice", "lower", "spectra", "write", "check", "validate"]


def test_stages_by_hand_give_what_compile_model_gives(tmp_path, calib):
    opts = dict(method="cast", calib=calib, perm_steps=20, output=str(tmp_path / "out.onnx"), calibration="dense")
    result = compile_model(bundled_model_path(MODEL), CompileOptions(**opts))
    staged = _staged(CompileOptions(**opts))
    assert result.check_ok and staged["check_ok"]
    assert [m.layer for m in result.masks] == list(staged["sparse"])
    for mask in result.masks:
        np.testing.assert_array_equal(mask.sparse, staged["sparse"][mask.layer])
    assert result.validation.to_dict() == staged["validation"]
    assert [vars(p) for p in result.permutations] == [vars(p) for p in staged["state"].permutations]
    assert set(result.seconds) == {"analyze", "validate", "calibrate", "permute", "mask", "spectra", "write",
                                   "check", "total"}


def test_layer_group_over_single_layers_equals_the_one_shot_run(calib):
    """Data-free masks do not depend on the other layers: one layer at a time is the same compile."""
    opts = CompileOptions(method="magnitude", permute=False)
    one_shot = _staged(opts)
    per_layer = _staged(CompileOptions(method="magnitude", permute=False), chunks=lambda sel: [[x] for x in sel])
    assert len(one_shot["sparse"]) >= 2
    assert list(per_layer["sparse"]) == list(one_shot["sparse"])
    for name, sparse in one_shot["sparse"].items():
        np.testing.assert_array_equal(per_layer["sparse"][name], sparse)
        assert np.count_nonzero(sparse) == sparse.size // 2
    assert per_layer["validation"] == one_shot["validation"]
    assert per_layer["check_ok"] and one_shot["check_ok"]


def test_layer_group_over_chunks_calibrates_later_layers_on_the_sparse_model(calib):
    """With a data-aware method the second chunk is captured after the first was masked:
    its first layer's masks match the one-shot run, the later layers see changed inputs."""
    one_shot = _staged(CompileOptions(method="cast", calib=calib, permute=False))
    sequential = _staged(CompileOptions(method="cast", calib=calib, permute=False),
                         chunks=lambda sel: [sel[:1], sel[1:]])
    first, *later = list(one_shot["sparse"])
    np.testing.assert_array_equal(sequential["sparse"][first], one_shot["sparse"][first])
    assert later and list(sequential["sparse"]) == list(one_shot["sparse"])
    assert sequential["check_ok"]
    # The dense weights are the same; the calibration that chose the masks is not.
    for name in later:
        np.testing.assert_array_equal(sequential["dense"][name], one_shot["dense"][name])
    changed = sum(int(np.count_nonzero(sequential["sparse"][n] != one_shot["sparse"][n])) for n in later)
    assert changed > 0  # (332 of 8192 entries of the second Gemm on this model and split)


def test_calibrate_over_a_scope_captures_only_those_layers_and_sees_earlier_masks(calib):
    path = bundled_model_path(MODEL)
    with RunOutputs([path], force=True) as files:
        state = CompileState(path, CompileOptions(method="cast", calib=calib, permute=False), files)
        run_stages(FRONT_STAGES, state)
        second = state.selected[1]
        run_stages([CalibrateStage()], state, layers=[second])
        assert list(state.stats_by_node) == [second.node]
        dense_diag = state.stats_by_node.pop(second.node).diagonal().copy()
        run_stages(LAYER_STAGES, state, layers=state.selected[:1])  # mask the first layer
        assert state.scope is None and [m.layer for m in state.masks] == [state.selected[0].name]
        run_stages([CalibrateStage()], state, layers=[second])
        sparse_diag = state.stats_by_node[second.node].diagonal()
        assert dense_diag.shape == sparse_diag.shape == (second.in_channels,)
        assert not np.allclose(dense_diag, sparse_diag)  # its inputs now come through a 2:4 layer


def test_run_stages_times_applicable_stages_and_accumulates_reruns(calib):
    path = bundled_model_path(MODEL)
    with RunOutputs([path], force=True) as files:
        state = CompileState(path, CompileOptions(method="magnitude", permute=False), files)
        run_stages(FRONT_STAGES, state)
        run_stages(LAYER_STAGES, state, layers=state.selected[:1])
        once = state.timings["mask"]
        run_stages(LAYER_STAGES, state, layers=state.selected[1:])
        assert state.timings["mask"] > once
        assert "drift_order" not in state.timings  # --order mp: the measured order does not apply
        assert [m.layer for m in state.masks] == [layer.name for layer in state.selected]


class _Refuse(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        raise UsageError("refused")


def test_graph_pass_errors_reach_the_user_unwrapped():
    model = ir.Model(ir.Graph([], [], nodes=[]), ir_version=8)
    with pytest.raises(UsageError, match="^refused$"):
        run_passes([_Refuse()], model)


def test_finetune_does_not_import_the_public_api():
    code = "import sys, mpcompile.finetune; assert 'mpcompile.api' not in sys.modules, 'cycle'; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
