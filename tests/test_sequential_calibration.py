"""Sequential calibration (``--calibration sequential``, the default): each depth group of layers
is captured on the model with the earlier groups already 2:4, as the SparseGPT/Wanda code does."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnxruntime as ort
import pytest

from mpcompile.checks.checker import check_model
from mpcompile.cli import main
from mpcompile.io.model_io import load_model
from mpcompile.io.outputs import RunOutputs
from mpcompile.passes.gemm_discovery import discover_gemms
from mpcompile.passes.sparsify_24 import write_matrix
from mpcompile.pipeline import BACK_STAGES, FRONT_STAGES, LAYER_STAGES, CompileOptions, compile_model
from mpcompile.stages.calibrate import CalibrateStage
from mpcompile.stages.sequential import depth_chunks
from mpcompile.stages.state import CompileState, run_stages

D = 64
SAMPLES = 48


def _weight(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    # uneven column scales make data-aware masks differ from magnitude and from each other
    return (rng.standard_normal((k, n)) * rng.uniform(0.2, 2.0, size=(k, 1))).astype(np.float32)


def _save(path, nodes, inits, out_dim: int = D) -> str:
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", D])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", out_dim])],
                          [onh.from_array(a, n) for n, a in inits.items()])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return str(path)


def mlp3(path, seed: int = 0, transposed: bool = False) -> str:
    """x → MatMul → Relu → MatMul → Relu → MatMul (optionally W3 stored [out, K] behind a Transpose)."""
    rng = np.random.default_rng(seed)
    inits = {"w1": _weight(rng, D, D), "w2": _weight(rng, D, D), "w3": _weight(rng, D, D)}
    nodes = [oh.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"), oh.make_node("Relu", ["h1"], ["a1"]),
             oh.make_node("MatMul", ["a1", "w2"], ["h2"], name="fc2"), oh.make_node("Relu", ["h2"], ["a2"])]
    if transposed:
        inits["w3t"] = np.ascontiguousarray(inits.pop("w3").T)
        nodes += [oh.make_node("Transpose", ["w3t"], ["w3"], perm=[1, 0], name="w3_T")]
    nodes += [oh.make_node("MatMul", ["a2", "w3"], ["y"], name="fc3")]
    return _save(path, nodes, inits)


def block(path, seed: int = 1) -> str:
    """A transformer-shaped block: q/k/v read one tensor, o reads their mix, then up and down."""
    rng = np.random.default_rng(seed)
    inits = {n: _weight(rng, D, D) for n in ("wq", "wk", "wv", "wo", "wu", "wd")}
    nodes = [oh.make_node("MatMul", ["x", "wq"], ["q"], name="q"), oh.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
             oh.make_node("MatMul", ["x", "wv"], ["v"], name="v"), oh.make_node("Mul", ["q", "k"], ["qk"]),
             oh.make_node("Add", ["qk", "v"], ["mix"]), oh.make_node("MatMul", ["mix", "wo"], ["o"], name="o"),
             oh.make_node("Add", ["o", "x"], ["res"]), oh.make_node("MatMul", ["res", "wu"], ["u"], name="up"),
             oh.make_node("Relu", ["u"], ["r"]), oh.make_node("MatMul", ["r", "wd"], ["y"], name="down")]
    return _save(path, nodes, inits)


def shared(path, seed: int = 2) -> str:
    """One stored weight read by two layers at different depths (x → W → Relu → W → W3)."""
    rng = np.random.default_rng(seed)
    inits = {"w": _weight(rng, D, D) * 0.2, "w3": _weight(rng, D, D)}
    nodes = [oh.make_node("MatMul", ["x", "w"], ["h1"], name="first"), oh.make_node("Relu", ["h1"], ["a1"]),
             oh.make_node("MatMul", ["a1", "w"], ["h2"], name="again"), oh.make_node("Relu", ["h2"], ["a2"]),
             oh.make_node("MatMul", ["a2", "w3"], ["y"], name="last")]
    return _save(path, nodes, inits)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("seq")


@pytest.fixture(scope="module")
def calib(folder) -> str:
    x = np.random.default_rng(7).standard_normal((SAMPLES, D)).astype(np.float32)
    np.savez(folder / "calib.npz", x=x)
    return str(folder / "calib.npz")


def _names(chunks) -> list[list[str]]:
    return [[layer.name for layer in chunk] for chunk in chunks]


def _gram(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x.T @ x / x.shape[0]


def test_second_layer_statistics_are_those_of_the_model_with_the_first_mask_applied(folder, calib):
    path = mlp3(folder / "mlp3.onnx")
    x = np.load(calib)["x"].astype(np.float64)
    with RunOutputs([path], force=True) as files:
        state = CompileState(path, CompileOptions(method="cast", calib=calib, permute=False), files)
        run_stages(FRONT_STAGES, state)
        chunks = depth_chunks(state.model, state.selected)
        assert _names(chunks) == [["fc1"], ["fc2"], ["fc3"]]
        run_stages(LAYER_STAGES, state, layers=chunks[0])
        w1_sparse = state.masks[0].sparse.T.astype(np.float64)  # [out, K] -> MatMul's [K, out]
        w1_dense = state.masks[0].dense.T.astype(np.float64)
        assert np.count_nonzero(w1_sparse) == w1_sparse.size // 2
        run_stages([CalibrateStage()], state, layers=chunks[1])
        captured = state.stats_by_node[chunks[1][0].node].gram
    by_hand = _gram(np.maximum(x @ w1_sparse, 0.0))
    dense = _gram(np.maximum(x @ w1_dense, 0.0))
    scale = np.abs(by_hand).max()
    np.testing.assert_allclose(captured, by_hand, rtol=0, atol=1e-6 * scale)
    assert np.abs(captured - dense).max() > 1e-2 * scale  # the dense protocol would see other inputs


def test_compile_takes_one_capture_pass_per_depth_group_and_dense_takes_one(folder, calib):
    path = block(folder / "block.onnx")
    model = load_model(path).model
    assert _names(depth_chunks(model, discover_gemms(model))) == [["q", "k", "v"], ["o"], ["up"], ["down"]]
    sequential = compile_model(path, CompileOptions(method="sparsegpt", calib=calib, permute=False,
                                                    output=str(folder / "block.seq.onnx")))
    dense = compile_model(path, CompileOptions(method="sparsegpt", calib=calib, permute=False, calibration="dense",
                                               output=str(folder / "block.dense.onnx")))
    assert (sequential.calibration_protocol, sequential.capture_passes) == ("sequential", 4)
    assert (dense.calibration_protocol, dense.capture_passes) == ("dense", 1)
    assert sequential.check_ok and dense.check_ok
    masks = {m.layer: m.sparse for m in dense.masks}
    # q/k/v are captured on the dense model either way; the later layers see the sparse ones
    for name in ("q", "k", "v"):
        np.testing.assert_array_equal(next(m.sparse for m in sequential.masks if m.layer == name), masks[name])
    assert any(not np.array_equal(m.sparse, masks[m.layer]) for m in sequential.masks if m.layer in ("up", "down"))
    magnitude = compile_model(path, CompileOptions(method="magnitude", output=str(folder / "block.mag.onnx")))
    assert (magnitude.calibration_protocol, magnitude.capture_passes) == (None, 0)


def test_shared_weight_is_masked_once_in_its_first_readers_group_and_checks(folder, calib):
    path = shared(folder / "shared.onnx")
    model = load_model(path).model
    assert _names(depth_chunks(model, discover_gemms(model))) == [["first", "again"], ["last"]]
    out = folder / "shared.sparse.onnx"
    result = compile_model(path, CompileOptions(method="cast-obs", calib=calib, permute=False, output=str(out)))
    assert result.check_ok and result.capture_passes == 2
    assert sorted(m.layer for m in result.masks) == ["first", "last"]  # "again" reads the same stored weight
    report = check_model(out)
    assert report.ok
    stored = onh.to_array(next(t for t in onnx.load(out).graph.initializer if t.name == "w"))
    assert np.count_nonzero(stored) == stored.size // 2
    # A permutation folded into "first"'s rows and "again"'s columns un-shares the weight (as
    # under the dense protocol): both copies are then masked, in the same group, and check.
    permuted = compile_model(path, CompileOptions(method="cast-obs", calib=calib, perm_steps=30,
                                                  output=str(folder / "shared.perm.onnx")))
    assert permuted.check_ok and permuted.capture_passes == 2
    assert check_model(folder / "shared.perm.onnx").ok


def _run(path, x) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_permuted_sequential_compile_keeps_mask_records_in_the_model_frame(folder, calib):
    """Later groups fold permutations into already masked producers (their rows): the records
    must follow, so writing every record's dense weight back gives the dense model again."""
    path = mlp3(folder / "mlp3p.onnx", seed=3)
    out = folder / "mlp3p.sparse.onnx"
    result = compile_model(path, CompileOptions(method="cast-obs", calib=calib, perm_steps=60, output=str(out)))
    assert result.check_ok and result.capture_passes == 3
    assert any(p.folded for p in result.permutations[1:])  # a fold into a masked producer happened
    assert result.validation.relative_l2 < 0.5
    model = load_model(out).model
    layers = {layer.name: layer for layer in discover_gemms(model)}
    for mask in result.masks:
        np.testing.assert_array_equal(layers[mask.layer].matrix(), mask.sparse)
        write_matrix(layers[mask.layer], np.asarray(mask.dense, np.float32))
    x = np.load(calib)["x"]
    restored = folder / "restored.onnx"
    onnx.save(__import__("onnx_ir").serde.serialize_model(model), restored)
    np.testing.assert_allclose(_run(restored, x), _run(path, x), rtol=1e-4, atol=1e-4)


def test_max_drift_fp16_and_transpose_chains_compile_validate_and_check(folder, calib):
    path = mlp3(folder / "mlp3t.onnx", seed=4, transposed=True)
    drift = compile_model(path, CompileOptions(method="cast-obs", calib=calib, perm_steps=30, max_drift=0.15,
                                               output=str(folder / "mlp3t.drift.onnx")))
    assert drift.check_ok and drift.calibration_protocol == "sequential"
    assert drift.validation.relative_l2 <= 0.15 + 1e-6
    fp16 = compile_model(path, CompileOptions(method="sparsegpt", calib=calib, perm_steps=30, fp16=True,
                                              output=str(folder / "mlp3t.fp16.onnx")))
    assert fp16.check_ok and fp16.capture_passes == 3 and len(fp16.masks) == 3
    assert fp16.validation.relative_l2 < 0.5
    assert check_model(folder / "mlp3t.fp16.onnx").ok


def test_cli_states_the_protocol_and_rejects_an_unknown_one(folder, calib, capsys):
    path = block(folder / "cli.onnx")
    out = folder / "cli.sparse.onnx"
    assert main(["compile", path, "--calib", calib, "--method", "wanda", "--no-permute", "-o", str(out), "--quiet"]) == 0
    report = json.loads((folder / "cli.sparse.report.json").read_text())
    assert report["calibration_protocol"] == {"protocol": "sequential", "capture_passes": 4}
    assert "calibration protocol: sequential" in (folder / "cli.sparse.report.md").read_text()
    assert "calibration protocol: sequential" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["compile", path, "--calib", calib, "--calibration", "twice"])
    assert exc.value.code == 2
    assert "--calibration" in capsys.readouterr().err
