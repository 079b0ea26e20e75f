"""The compile pipeline end to end on small torch-exported models (no bundled data needed)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnx.numpy_helper
import pytest

from mpcompile.analyze import analyze_model
from mpcompile.checks.checker import check_model
from mpcompile.cli import main
from mpcompile.errors import MpcompileError
from mpcompile.io.model_io import load_model
from mpcompile.passes.gemm_discovery import discover_gemms
from mpcompile.passes.sparsify_24 import matrix_to_stored
from mpcompile.pipeline import CompileOptions, compile_model
from mpcompile.selection.orders import select_layers
from mpcompile.checks.validate import compare_outputs

torch = pytest.importorskip("torch")


class SmallNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.c3 = torch.nn.Conv2d(32, 32, 1)
        self.fc1 = torch.nn.Linear(32, 64)
        self.fc2 = torch.nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))
        return self.fc2(torch.relu(self.fc1(h.mean(dim=(2, 3)))))


@pytest.fixture
def small_net(export):
    return export(SmallNet(), (torch.randn(2, 3, 8, 8),), dynamo=False)


@pytest.mark.parametrize("dynamo", [False, True])
def test_matrix_to_stored_inverts_every_layout(export, dynamo):
    path = export(SmallNet(), (torch.randn(2, 3, 8, 8),), dynamo=dynamo)
    for layer in discover_gemms(load_model(path).model):
        stored = layer.weight.stored_array()
        np.testing.assert_array_equal(matrix_to_stored(layer.matrix(), layer, stored.shape), stored)


@pytest.mark.parametrize("method", ["magnitude", "cast", "wanda", "sparsegpt"])
def test_compile_writes_legal_24_and_keeps_input(small_net, tmp_path, method):
    before = hashlib.sha256(small_net.read_bytes()).hexdigest()
    out = tmp_path / f"{method}.onnx"
    result = compile_model(small_net, CompileOptions(method=method, permute=False, output=str(out)))
    assert hashlib.sha256(small_net.read_bytes()).hexdigest() == before
    assert result.check_ok
    check = check_model(out)
    marked = {c.node for c in check.layers if c.marked}
    assert len(marked) == 3  # c1 has Cin=3 and fc2 only 10 outputs: both stay dense
    assert all(c.legal for c in check.layers if c.marked)
    # every marked weight keeps at most half its entries (SparseGPT may zero dead inputs too)
    for c in check.layers:
        if c.marked:
            assert c.density <= 0.5 + 1e-9
            if method != "sparsegpt":
                assert c.density == pytest.approx(0.5, abs=0.02)
    v = result.validation
    assert v.samples == 16 and 0.0 < v.relative_l2 < 1.0
    report = result.to_dict()
    json.dumps(report)
    assert report["selection"]["sparse_layers"] == 3


def test_target_selects_fraction_of_macs_in_mp_order(small_net):
    analysis = analyze_model(small_net)
    result = analysis.result
    half = select_layers(result, target=0.5)
    ranked = sorted((a for a in result.layers if a.layer.eligible), key=lambda a: a.prune_rank)
    # the chosen layers are a prefix of the MP ranking and cover ≥ 50 % of eligible MACs
    chosen = set(half.selected_names)
    prefix = [a.name for a in ranked][: len(chosen)]
    assert chosen == set(prefix)
    assert half.selected_macs >= 0.5 * half.eligible_macs
    without_last = half.selected_macs - next(d.macs for d in half.decisions if d.name == prefix[-1])
    assert without_last < 0.5 * half.eligible_macs
    none = select_layers(result, target=0.0)
    assert none.selected_names == []


def test_certificate_counts_samples_whose_margin_exceeds_twice_the_change():
    dense = np.array([[5.0, 1.0, 0.0], [1.0, 1.1, 0.0], [0.0, 3.0, 2.0]])
    sparse = dense + np.array([[0.5, -0.5, 0.0], [0.2, 0.0, 0.0], [0.0, 0.0, 0.6]])
    cmp = compare_outputs(dense, sparse, labels=np.array([0, 1, 1]))
    # margins 4, 0.1, 1 vs 2·max|Δ| = 1, 0.4, 1.2 → only sample 0 certified
    assert cmp.certified == 1
    assert cmp.top1_agreement == pytest.approx(2 / 3)  # sample 1 flips from class 1 to class 0
    assert cmp.dense_accuracy == pytest.approx(1.0) and cmp.sparse_accuracy == pytest.approx(2 / 3)


def test_cli_compile_and_check(small_net, tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    assert main(["-q", str(small_net), "-o", str(out), "--no-permute", "--method", "magnitude"]) == 0
    report = json.loads((tmp_path / "cli.report.json").read_text())
    assert report["schema_version"] == "1.0" and report["check"]["ok"] is True
    assert main(["check", str(out)]) == 0
    capsys.readouterr()
    # the same file with one marked weight broken on the wrong axis fails the check
    model = onnx.load(out)
    for init in model.graph.initializer:
        if init.name == "fc1.weight":
            arr = onnx.numpy_helper.to_array(init).copy()
            arr[:, :] = 1.0
            arr[:, 0::2] = 0.0  # 2 of 4 along K kept… but rows all dense along N
            arr[0, :] = 1.0
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, broken)
    assert main(["check", str(broken)]) == 1


def test_cli_refuses_to_overwrite_input(small_net, capsys):
    assert main(["-q", str(small_net), "-o", str(small_net), "--no-permute"]) == 2
    assert "is the input file" in capsys.readouterr().err


def test_analyze_json_and_annotate(small_net, tmp_path, capsys):
    annotated = tmp_path / "annotated.onnx"
    assert main(["analyze", str(small_net), "--json", "--annotate", str(annotated)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["summary"]["layers"] == 5 and report["summary"]["eligible_layers"] == 3
    props = {
        n.name: {p.key: p.value for p in n.metadata_props}
        for n in onnx.load(annotated).graph.node if n.op_type in ("Conv", "Gemm")
    }
    assert all("mpcompile.mp_sigma_plus" in p for p in props.values())
    sigma_plus = {layer["name"]: layer["mp"]["sigma_plus"] for layer in report["layers"]}
    for name, p in props.items():
        assert float(p["mpcompile.mp_sigma_plus"]) == pytest.approx(sigma_plus[name], rel=1e-5)


def test_max_drift_keeps_drift_within_budget(small_net, tmp_path):
    full = compile_model(small_net, CompileOptions(method="magnitude", permute=False, output=str(tmp_path / "a.onnx")))
    budget = full.validation.relative_l2 * 0.6
    limited = compile_model(small_net, CompileOptions(
        method="magnitude", permute=False, max_drift=budget, order="drift", output=str(tmp_path / "b.onnx")))
    assert limited.validation.relative_l2 <= budget
    assert 0 < len(limited.selection.selected_names) < len(full.selection.selected_names)
    assert limited.check_ok
    marked = [c for c in check_model(tmp_path / "b.onnx").layers if c.marked]
    assert len(marked) == len(limited.selection.selected_names)


def test_max_drift_trims_the_mp_ranking_from_its_end(small_net, tmp_path):
    def compiled(name: str, **options):
        return compile_model(small_net, CompileOptions(method="magnitude", permute=False,
                                                       output=str(tmp_path / name), **options))

    full = compiled("a.onnx")
    first_only = compiled("b.onnx", target=1e-3)  # the first layer of the MP ranking alone
    assert len(first_only.selection.selected_names) == 1
    budget = (first_only.validation.relative_l2 + full.validation.relative_l2) / 2
    assert first_only.validation.relative_l2 < budget < full.validation.relative_l2
    limited = compiled("c.onnx", max_drift=budget)
    # the budget admits the MP-ranked prefix of one layer, whatever the graph order is
    assert limited.selection.selected_names == first_only.selection.selected_names
    assert limited.selection.ranking == full.selection.ranking


def test_drift_order_ranks_by_measured_drift_per_mac(small_net, tmp_path):
    from mpcompile.io.calibration import run_model, synthetic_inputs
    from mpcompile.passes.sparsify_24 import write_matrix
    from mpcompile.checks.validate import relative_drift

    result = compile_model(small_net, CompileOptions(
        method="magnitude", permute=False, order="drift", target=0.5, output=str(tmp_path / "d.onnx")))
    selection = result.selection
    assert selection.order == "drift" and result.check_ok
    assert selection.selected_macs >= 0.5 * selection.eligible_macs
    assert any("--order drift" in note for note in result.notes)
    # Re-measure each layer's drift alone on the same sample, independently of the pipeline.
    loaded = load_model(small_net)
    layers = {layer.name: layer for layer in discover_gemms(loaded.model)}
    data = synthetic_inputs(loaded.model, CompileOptions().shape_spec, 16, 0)
    dense_out = run_model(loaded.model, data)[0]
    from mpcompile.numerics.masks import apply_method

    macs = {d.name: d.macs for d in selection.decisions}
    per_mac = {}
    for name in selection.ranking:
        w = layers[name].matrix()
        write_matrix(layers[name], apply_method("magnitude", w, None).weight)
        per_mac[name] = relative_drift(dense_out, run_model(loaded.model, data)[0]) / macs[name]
        write_matrix(layers[name], w)
    assert len(per_mac) == 3  # c1 (Cin=3) and fc2 (10 outputs) are not eligible
    costs = [per_mac[name] for name in selection.ranking]
    assert costs == sorted(costs)
    kept = selection.selected_names
    assert set(kept) == set(selection.ranking[: len(kept)]) and 0 < len(kept) < 3
    assert all("measured drift" in d.reason for d in selection.decisions if d.sparse)
    marked = [c.node for c in check_model(tmp_path / "d.onnx").marked]
    assert sorted(marked) == sorted(kept)


def test_rank_by_measurement_moves_shared_weights_together():
    from mpcompile.selection.orders import LayerDecision, Selection, rank_by_measurement

    decisions = [LayerDecision(n, True, "", None, m) for n, m in (("a", 100), ("b", 100), ("b2", 100), ("c", 200))]
    selection = Selection(decisions, 1.0, "drift", 500, 500, ["a", "b", "b2", "c"])
    # b (shared with b2) costs least per MAC: 0.2 / 200; then c: 0.5 / 200; then a: 0.4 / 100
    kept = rank_by_measurement(selection, {"a": 0.4, "b": 0.2, "c": 0.5}, 0.5, {"b": ["b", "b2"]})
    assert kept == ["b", "c"]
    assert selection.ranking == ["b", "b2", "c", "a"]
    assert selection.selected_names == ["b", "b2", "c"] and selection.selected_macs == 400
    assert not decisions[0].sparse and "kept dense" in decisions[0].reason


def test_build_without_tensorrt_exits_6_with_modeled_report(small_net, tmp_path, capsys):
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed: the measured path runs instead")
    except ImportError:
        pass
    out = tmp_path / "s.onnx"
    assert main(["-q", str(small_net), "-o", str(out), "--no-permute"]) == 0
    capsys.readouterr()
    assert main(["build", str(out), "--shape", "input:64x3x8x8", "-o", str(tmp_path / "b.json")]) == 6
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no measured build here" in err[0]
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["measured"]["available"] is False
    assert {item["gpu"] for item in report["speedup"]} == {"A40", "A100-SXM4-80GB"}
    for item in report["speedup"]:
        assert item["kind"] == "modeled"
        assert 1.0 <= item["speedup"] <= item["amdahl_bound"] + 1e-9


def test_fp16_im2col_and_gather_paths_on_bundled_models(tmp_path):
    from mpcompile.zoo.bundled import bundled_model_path, write_split_npz

    calib = write_split_npz("calib", tmp_path / "calib.npz", model="digits_cnn")
    test = write_split_npz("test", tmp_path / "test.npz", model="digits_cnn")
    out = tmp_path / "cnn16.onnx"
    result = compile_model(
        bundled_model_path("digits_cnn"),
        CompileOptions(calib=str(calib), eval_data=str(test), fp16=True, conv="im2col", output=str(out)),
    )
    assert result.check_ok
    model = onnx.load(out)
    ops = {n.op_type for n in model.graph.node}
    assert "Slice" in ops and "Concat" in ops  # convs lowered to an explicit unfold
    weights = {i.name: i.data_type for i in model.graph.initializer}
    marked = [n for n in model.graph.node if any(p.key == "mpcompile.sparsity" for p in n.metadata_props)]
    assert marked and all(n.op_type in ("MatMul", "Gemm") for n in marked)
    assert all(weights[n.input[1]] == onnx.TensorProto.FLOAT16 for n in marked if n.input[1] in weights)
    assert result.validation.dense_accuracy - result.validation.sparse_accuracy <= 0.02

    vit_calib = write_split_npz("calib", tmp_path / "vcalib.npz", model="digits_vit")
    gathered = compile_model(
        bundled_model_path("digits_vit"),
        CompileOptions(calib=str(vit_calib), allow_gather=True, output=str(tmp_path / "vit.onnx")),
    )
    assert gathered.check_ok
    inserted = [p for p in gathered.permutations if p.gather_inserted]
    assert inserted and sum(n.op_type == "Gather" for n in onnx.load(tmp_path / "vit.onnx").graph.node) >= len(inserted)


@pytest.mark.parametrize("method", ["rmt-sv", "spectral-sample", "magnitude-unstructured"])
def test_unstructured_seed_methods_remove_the_requested_fraction(small_net, tmp_path, method):
    out = tmp_path / f"{method}.onnx"
    result = compile_model(small_net, CompileOptions(method=method, sparsity=0.4, output=str(out)))
    assert result.check_ok and result.speedup == []
    sizes = np.array([m.dense.size for m in result.masks])
    removed = np.array([np.mean(m.sparse == 0) for m in result.masks])
    assert np.dot(sizes, removed) / sizes.sum() == pytest.approx(0.4, abs=0.01)
    model = onnx.load(out)
    marks = {p.value for n in model.graph.node for p in n.metadata_props if p.key == "mpcompile.sparsity"}
    assert marks == {"unstructured"}  # never claimed as 2:4


def test_cli_style_compile_releases_dense_weights_after_the_spectra(small_net, tmp_path):
    from mpcompile.errors import UsageError

    kept = compile_model(small_net, CompileOptions(method="magnitude", permute=False, output=str(tmp_path / "a.onnx")))
    released = compile_model(small_net, CompileOptions(method="magnitude", permute=False, keep_dense=False,
                                                       output=str(tmp_path / "b.onnx")))
    assert released.spectra() == kept.spectra() and kept.spectra()
    np.testing.assert_array_equal(kept.masks[0].sparse, released.masks[0].sparse)
    assert kept.masks[0].dense.shape == kept.masks[0].sparse.shape
    with pytest.raises(UsageError, match="released"):
        _ = released.masks[0].dense


def _two_layer_mlp(tmp_path, rows: int):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(512, 512)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(512, 64)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="wide"), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="narrow")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, 64])], initializer=[w1, w2])
    path = tmp_path / f"mlp{rows}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_only_profitable_keeps_dense_what_tensorrt_would_run_dense(tmp_path):
    from mpcompile.errors import UnsupportedModelError

    path = _two_layer_mlp(tmp_path, rows=4096)
    result = compile_model(path, CompileOptions(method="magnitude", permute=False, only_profitable="A100-SXM4-80GB",
                                                synthetic_samples=2, output=str(tmp_path / "p.onnx")))
    decisions = {d.name: d for d in result.selection.decisions}
    assert decisions["wide"].sparse  # 4096×512×512: compute bound, 512 channels
    assert not decisions["narrow"].sparse and "64" in decisions["narrow"].reason and "A100" in decisions["narrow"].reason
    assert [c.node for c in check_model(tmp_path / "p.onnx").marked] == ["wide"]
    plain = compile_model(path, CompileOptions(method="magnitude", permute=False, synthetic_samples=2,
                                               output=str(tmp_path / "q.onnx")))
    assert set(plain.selection.selected_names) == {"wide", "narrow"}
    # one row: every GEMM is memory bound, nothing is worth pruning, and the error says why
    with pytest.raises(UnsupportedModelError, match="only-profitable"):
        compile_model(_two_layer_mlp(tmp_path, rows=1), CompileOptions(
            method="magnitude", permute=False, only_profitable="A100-SXM4-80GB", output=str(tmp_path / "r.onnx")))


@pytest.mark.parametrize("option", [{"max_drift": 0.1}, {"order": "drift"}, {"conv": "im2col"}])
def test_unstructured_methods_refuse_2_4_only_options(small_net, tmp_path, option):
    from mpcompile.errors import UsageError

    out = tmp_path / "u.onnx"
    with pytest.raises(UsageError, match="unstructured"):
        compile_model(small_net, CompileOptions(method="rmt-sv", output=str(out), **option))
    assert not out.exists()


def test_report_spectra_are_the_dense_ones_the_law_was_fitted_to(small_net, tmp_path):
    from mpcompile.report.html import _largest_spectra
    from mpcompile.numerics.mp_law import matrix_eigenvalues

    dense = {layer.name: matrix_eigenvalues(layer.matrix()) for layer in discover_gemms(load_model(small_net).model)}
    result = compile_model(small_net, CompileOptions(method="magnitude", keep_dense=False,
                                                     output=str(tmp_path / "s.onnx")))
    shown = _largest_spectra(result.analysis.result.layers)
    assert shown
    for name, s2, _ in shown:  # not the pruned weight the layer now holds
        np.testing.assert_allclose(s2, np.sort(dense[name]), rtol=1e-6, atol=1e-9)


def test_perm_steps_make_a_compile_reproducible(tmp_path):
    from mpcompile.zoo.bundled import bundled_model_path

    def weights(name: str) -> dict[str, np.ndarray]:
        result = compile_model(bundled_model_path("digits_vit"), CompileOptions(
            method="cast", perm_steps=12, output=str(tmp_path / name)))
        assert any(p.kept_after is not None and p.kept_after > p.kept_before for p in result.permutations)
        model = onnx.load(str(tmp_path / name))
        return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}

    first, second = weights("a.onnx"), weights("b.onnx")
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[k], second[k]) for k in first)
    with pytest.raises(MpcompileError, match="perm-steps"):
        compile_model(bundled_model_path("digits_vit"), CompileOptions(perm_steps=-1, output=str(tmp_path / "c.onnx")))
