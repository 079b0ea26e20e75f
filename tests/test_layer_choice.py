"""The ``--max-drift`` layer choice (``--order choice``): real models, drift re-measured in ONNX Runtime.

The model: x[batch, 512] → costly (512×512 Gaussian: 2:4 hurts) → Relu → cheap (512×512 whose
weights are nearly 2:4 already) → Relu → narrow (512×64). At batch 4096 the speed model says the
two wide layers run sparse on an A100 and the narrow one (N = 64) stays dense.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mpcompile.cli import main
from mpcompile.io.shapes import ShapeSpec
from mpcompile.pipeline import CompileOptions, compile_model
from mpcompile.selection.choice import Unit, choose_within_budget

GPU = "A100-SXM4-80GB"
SHAPES = ShapeSpec(dims={"batch": 4096})


def _nearly_24(rng, k: int, n: int, small: float) -> np.ndarray:
    """[K, N] weight whose two smallest of every 4 along K are ``small`` × the others."""
    w = rng.normal(size=(k, n))
    scale = np.ones((k, n))
    for start in range(0, k, 4):
        picks = rng.permuted(np.tile([0, 1, 2, 3], (n, 1)), axis=1)[:, :2]  # 2 of 4 per output
        for j in range(2):
            scale[start + picks[:, j], np.arange(n)] = small
    return (w * scale).astype(np.float32)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("choice")
    rng = np.random.default_rng(0)
    weights = {
        "w_costly": (rng.normal(size=(512, 512)) / np.sqrt(512)).astype(np.float32),
        "w_cheap": _nearly_24(rng, 512, 512, 0.05) / np.float32(np.sqrt(256)),
        "w_narrow": _nearly_24(rng, 512, 64, 0.02) / np.float32(np.sqrt(256)),
    }
    nodes = [helper.make_node("MatMul", ["x", "w_costly"], ["h1"], name="costly"),
             helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w_cheap"], ["h2"], name="cheap"),
             helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("MatMul", ["r2", "w_narrow"], ["y"], name="narrow")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 512])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()])
    path = folder / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    calib = folder / "calib.npz"
    np.savez(calib, x=rng.normal(size=(96, 512)).astype(np.float32))
    return path, calib


def _ort_drift(dense_path, sparse_path, calib) -> float:
    """Mean per-sample relative L2 distance of the outputs, computed here, not by mpcompile."""
    x = np.load(calib)["x"]
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    dense, sparse = run(dense_path).astype(np.float64), run(sparse_path).astype(np.float64)
    return float(np.mean(np.linalg.norm(sparse - dense, axis=1) / np.linalg.norm(dense, axis=1)))


def _magnitude_24(w: np.ndarray) -> np.ndarray:
    """A MatMul weight [K, N] with the 2 largest |w| of every 4 along K kept (an independent 2:4)."""
    groups = w.reshape(w.shape[0] // 4, 4, w.shape[1])
    order = np.argsort(-np.abs(groups), axis=1, kind="stable")
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, order[:, :2], True, axis=1)
    return (groups * keep).reshape(w.shape)


@pytest.fixture(scope="module")
def alone(model, tmp_path_factory) -> dict[str, float]:
    """Each layer's drift with its weight alone made magnitude 2:4, computed here (numpy + ORT)."""
    path, calib = model
    folder = tmp_path_factory.mktemp("alone")
    drifts = {}
    for name in ("costly", "cheap", "narrow"):
        proto = onnx.load(path)
        for init in proto.graph.initializer:
            if init.name == f"w_{name}":
                init.CopyFrom(numpy_helper.from_array(_magnitude_24(numpy_helper.to_array(init)), init.name))
        out = folder / f"only_{name}.onnx"
        onnx.save(proto, out)
        drifts[name] = _ort_drift(path, out, calib)
    return drifts


def _compile(model, tmp_path, name: str, **options):
    path, calib = model
    return compile_model(path, CompileOptions(method="magnitude", permute=False, calib=str(calib),
                                              output=str(tmp_path / name), shape_spec=SHAPES, **options))


def test_large_drift_layer_rejected_cheaper_accepted_and_no_gain_layer_skipped(model, alone, tmp_path):
    assert alone["cheap"] < alone["costly"] / 3  # the fixture does what it says
    budget = (alone["cheap"] + alone["costly"]) / 2
    result = _compile(model, tmp_path, "gpu.onnx", max_drift=budget, gpu=GPU)
    decisions = {d.name: d for d in result.selection.decisions}
    assert result.selection.order == "choice"  # the default for --max-drift with --calib
    assert decisions["cheap"].sparse and not decisions["costly"].sparse
    assert "exceeds --max-drift" in decisions["costly"].reason or "over budget" in decisions["costly"].reason
    # the speed model: N = 64 stays dense on an A100, so it is not chosen although it fits the budget
    assert not decisions["narrow"].sparse and "no modeled gain" in decisions["narrow"].reason
    units = {u["layers"][0]: u for u in result.selection.choice["units"]}
    assert units["narrow"]["gain"] == 0 and units["narrow"]["drift_alone"] is None  # never measured
    assert units["cheap"]["gain"] > 0 and units["cheap"]["drift_after"] <= budget
    assert result.selection.choice["modeled_speedup"] > 1.0
    # a uniform (graph-order) prefix under the same budget stops at the costly first layer: nothing
    uniform = _compile(model, tmp_path, "graph.onnx", max_drift=budget, order="graph")
    assert uniform.selection.selected_names == []
    # without --gpu the gain is MACs: the narrow layer (cheap in drift) is now worth taking
    by_macs = _compile(model, tmp_path, "macs.onnx", max_drift=budget)
    assert set(by_macs.selection.selected_names) == {"cheap", "narrow"}


@pytest.mark.parametrize("samples", [256, 32])  # 32: greedy on a sample, then verified on all 96
def test_chosen_set_stays_within_budget_remeasured_in_onnxruntime(model, alone, tmp_path, monkeypatch, samples):
    path, calib = model
    monkeypatch.setattr("mpcompile.stages.choice.CHOICE_SAMPLES", samples)
    budgets = ((0.5 * alone["cheap"] + 0.5 * alone["narrow"], 0.5 * alone["costly"]) if samples > 96
               else (1.05 * (alone["cheap"] + alone["narrow"]),))
    for budget in budgets:
        result = _compile(model, tmp_path, "b.onnx", max_drift=budget)
        assert result.selection.choice["sample_samples"] == min(samples, 96)
        measured = _ort_drift(path, result.output_path, calib)
        assert measured <= budget + 1e-6, (budget, measured, result.selection.selected_names)
        assert result.selection.choice["drift_on_calibration"] == pytest.approx(measured, rel=1e-4, abs=1e-6)
        assert 0 < len(result.selection.selected_names) < 3


def test_choice_is_deterministic_and_explained_in_every_report(model, tmp_path, capsys):
    path, calib = model
    args = [str(path), "--calib", str(calib), "--method", "magnitude", "--no-permute", "--max-drift", "0.08",
            "--gpu", "A100", "--dim", "batch=4096", "--seed", "3"]
    reports = []
    for name in ("r1", "r2"):
        assert main(["compile", *args, "-o", str(tmp_path / f"{name}.onnx")]) == 0
        reports.append(json.loads((tmp_path / f"{name}.report.json").read_text()))
    out = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert "layer choice for --max-drift 0.08 on A100-SXM4-40GB" in out and "modeled, not measured" in out
    first, second = (r["selection"]["choice"] for r in reports)
    assert first == second
    assert [u["accepted"] for u in first["units"]] == [False, True, False]
    markdown = (tmp_path / "r1.report.md").read_text()
    assert "## Layer choice" in markdown and "µs (modeled)" in markdown
    html = (tmp_path / "r1.report.html").read_text()
    assert "<h2>Layer choice</h2>" in html


@pytest.mark.parametrize("extra, message", [
    (["--max-drift", "0.1", "--gpu", "Z80"], "no datasheet figures for GPU 'Z80'"),
    (["--gpu", "A100"], "--gpu weighs layers for the --max-drift layer choice"),
    (["--order", "choice"], "--order choice spends an accuracy budget"),
])
def test_bad_choice_options_are_one_line_usage_errors(model, tmp_path, capsys, extra, message):
    path, calib = model
    code = main(["compile", str(path), "--calib", str(calib), "-o", str(tmp_path / "x.onnx"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "x.onnx").exists()


def test_without_calibration_max_drift_keeps_the_data_free_mp_order(model, tmp_path):
    path, _ = model
    result = compile_model(path, CompileOptions(method="magnitude", permute=False, max_drift=0.5,
                                                output=str(tmp_path / "s.onnx")))
    assert result.selection.order == "mp" and result.selection.choice is None


def _additive(costs: dict[int, float], interaction: dict[frozenset, float] | None = None):
    """Drift = sqrt(sum of energies of the units made 2:4, plus pairwise interaction energies)."""
    state: set[int] = set()
    calls: list[int] = []

    def drift_with(extra: int) -> float:
        calls.append(extra)
        on = state | {extra}
        energy = sum(costs[i] for i in on) + sum(v for pair, v in (interaction or {}).items() if pair <= on)
        return float(np.sqrt(energy))

    return state, calls, drift_with


def test_greedy_takes_best_gain_per_energy_and_re_measures_interactions():
    units = [Unit([f"u{i}"], gain, "", prior) for i, (gain, prior) in enumerate([(10, 3), (10, 2), (1, 1), (0, 0)])]
    costs = {0: 0.01, 1: 0.02, 2: 0.0001, 3: 0.0}
    # u0 and u2 interact badly: together they cost much more than apart
    state, calls, drift_with = _additive(costs, {frozenset({0, 2}): 0.05})
    outcome = choose_within_budget(units, 0.3, drift_with, drift_with, state.add)
    # ratios alone: u2 10000, u0 1000, u1 500; u3 has no gain and is never measured
    assert 3 not in calls and "no modeled gain" in outcome.decisions[3].reason
    # u0 after u2 costs 0.06 energy (ratio 167 < u1's 500): deferred, u1 taken, u0 re-measured and taken
    assert outcome.accepted == [2, 1, 0] and "re-measuring" in outcome.decisions[0].reason
    assert outcome.drift == pytest.approx(np.sqrt(0.0001 + 0.02 + 0.01 + 0.05))
    assert outcome.evaluations == len(calls) == 3 + 3 + 1  # alone ×3, greedy ×3, one re-measure
    # a tighter budget: u0 no longer fits beside u2 and is rejected with the numbers
    state, _, drift_with = _additive(costs, {frozenset({0, 2}): 0.05})
    tight = choose_within_budget(units, 0.2, drift_with, drift_with, state.add)
    assert tight.accepted == [2, 1] and "over budget" in tight.decisions[0].reason
    assert tight.drift <= 0.2 and tight.decisions[0].drift_after > 0.2


def test_mp_prior_orders_near_ties_and_graph_order_without_it():
    units = [Unit(["a"], 1.0, "", 2), Unit(["b"], 1.05, "", 1)]  # ratios within 20 %: a tie
    budget = 0.12  # room for one of them only
    for prior, first in (("mp", 1), ("graph", 0)):
        state, _, drift_with = _additive({0: 0.01, 1: 0.01})
        outcome = choose_within_budget(units, budget, drift_with, drift_with, state.add, prior=prior)
        assert outcome.accepted == [first]
