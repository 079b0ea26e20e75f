"""Giving dense weights back to pruned layers (``mpcompile.revert``): permuted, FP16 and
Transpose-chained models, each checked with ONNX Runtime against an independent reference."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mpcompile.checks.checker import check_model
from mpcompile.io.model_io import load_model
from mpcompile.passes.gemm_discovery import discover_gemms
from mpcompile.passes.permute_channels import INPUT_ORDER_KEY
from mpcompile.passes.sparsify_24 import write_matrix
from mpcompile.pipeline import CompileOptions, compile_model
from mpcompile.revert import RevertError, revert_dense_weights

DATA = Path(__file__).resolve().parents[1] / "mpcompile" / "data"


def run(path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    s = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.astype(np.float32)})[0]


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """The demo CNN compiled with folded permutations (three of its four layers permuted)."""
    tmp = tmp_path_factory.mktemp("revert")
    dense = tmp / "cnn.onnx"
    shutil.copy(DATA / "digits_cnn.onnx", dense)
    result = compile_model(dense, CompileOptions(output=str(tmp / "cnn.sparse.onnx"), perm_steps=200, seed=0))
    assert sum(p.folded for p in result.permutations) >= 2
    data = np.load(DATA / "digits_data.npz")
    return tmp, dense, result, data["x_test"], data["y_test"]


def _dense_with_others_sparse(result, layer: str, out: Path) -> Path:
    """Reference from the compile's own in-memory state: the sparse model with ``layer``'s
    pre-mask weight (held by the pipeline in the permuted frame), not the recorded orders."""
    model = load_model(result.output_path).model
    mask = next(m for m in result.masks if m.layer == layer)
    target = next(g for g in discover_gemms(model) if g.name == layer)
    write_matrix(target, mask.dense)
    onnx.save(onnx.load(result.output_path), out)  # same graph, then patch the one weight
    proto = onnx.load(out)
    stored = target.weight.stored_tensor()
    for init in proto.graph.initializer:
        if init.name == stored.name:
            init.CopyFrom(numpy_helper.from_array(stored.numpy(), stored.name))
    onnx.save(proto, out)
    return out


def test_revert_one_permuted_layer_matches_dense_with_others_sparse(cnn):
    tmp, dense, result, x, y = cnn
    folded = [name for p in result.permutations if p.folded for name in p.layers]
    layer = folded[0]
    res = revert_dense_weights(result.output_path, dense, [layer], tmp / "one.onnx")
    assert res.layers == [layer] and res.check_drift < 1e-5
    reference = run(_dense_with_others_sparse(result, layer, tmp / "ref.onnx"), x)
    reverted = run(tmp / "one.onnx", x)
    np.testing.assert_allclose(reverted, reference, rtol=0, atol=1e-5)
    assert (reverted.argmax(1) == y).mean() == (reference.argmax(1) == y).mean()
    # the layer is no longer marked 2:4; the others still are
    marks = {c.node: c.marked for c in check_model(tmp / "one.onnx").layers}
    assert marks[layer] is False and sum(marks.values()) == len(result.masks) - 1


def test_revert_all_permuted_layers_gives_dense_outputs(cnn):
    tmp, dense, result, x, y = cnn
    marked = [c.node for c in check_model(result.output_path).layers if c.marked]
    res = revert_dense_weights(result.output_path, dense, marked, tmp / "all.onnx")
    np.testing.assert_allclose(run(tmp / "all.onnx", x), run(dense, x), rtol=0, atol=1e-5)
    assert res.drift < 1e-5 < res.sparse_drift
    dense_acc = (run(dense, x).argmax(1) == y).mean()
    assert (run(tmp / "all.onnx", x).argmax(1) == y).mean() == dense_acc


def test_revert_refuses_a_permuted_layer_without_recorded_order(cnn, tmp_path):
    tmp, dense, result, x, y = cnn
    proto = onnx.load(result.output_path)
    for node in proto.graph.node:
        kept = [p for p in node.metadata_props if p.key != INPUT_ORDER_KEY]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    onnx.save(proto, tmp_path / "old.onnx")
    with pytest.raises(RevertError, match="not recorded"):
        revert_dense_weights(tmp_path / "old.onnx", dense, ["/head/head.0/Gemm"], tmp_path / "r.onnx")
    assert not (tmp_path / "r.onnx").exists()


def test_revert_refuses_the_wrong_dense_model(cnn, tmp_path):
    tmp, dense, result, x, y = cnn
    # a dense model that differs outside the pruned weights (the revert proves only the rest)
    proto = onnx.load(dense)
    pruned = {i for n in proto.graph.node if n.name in {m.layer for m in result.masks} for i in n.input[1:2]}
    init = next(i for i in proto.graph.initializer if i.name not in pruned and len(i.dims) >= 1
                and i.data_type == TensorProto.FLOAT and numpy_helper.to_array(i).size > 4)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5 + 0.1, init.name))
    onnx.save(proto, tmp_path / "other.onnx")
    with pytest.raises(RevertError, match="does not reproduce"):
        revert_dense_weights(result.output_path, tmp_path / "other.onnx", ["/head/head.0/Gemm"],
                             tmp_path / "r.onnx")
    assert not (tmp_path / "r.onnx").exists()


def test_revert_fp16_model_writes_fp16_weights(cnn, tmp_path):
    tmp, dense, _, x, y = cnn
    compile_model(dense, CompileOptions(output=str(tmp_path / "h.onnx"), fp16=True, perm_steps=200))
    marked = [c.node for c in check_model(tmp_path / "h.onnx").layers if c.marked]
    res = revert_dense_weights(tmp_path / "h.onnx", dense, marked[:1], tmp_path / "h1.onnx")
    assert res.precision == "float16" and res.check_drift < 2e-2
    model = load_model(tmp_path / "h1.onnx").model
    layer = next(g for g in discover_gemms(model) if g.name == marked[0])
    assert layer.weight.stored_tensor().dtype.numpy() == np.float16
    # runs in ONNX Runtime and, all reverted, matches dense to FP16 rounding
    revert_dense_weights(tmp_path / "h.onnx", dense, marked, tmp_path / "hall.onnx")
    got, want = run(tmp_path / "hall.onnx", x), run(dense, x)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2
    assert np.isfinite(run(tmp_path / "h1.onnx", x)).all()


def _chained_mlp(path: Path, rng: np.random.Generator) -> Path:
    """X→MatMul(Transpose(W1t))→Relu→MatMul(Transpose(Cast(W2t_f64)))→Y: weights behind chains."""
    w1t = rng.standard_normal((64, 32)).astype(np.float32)   # stored [N, K], read as [K, N]
    w2t = rng.standard_normal((32, 64)).astype(np.float64)
    nodes = [
        helper.make_node("Transpose", ["W1t"], ["W1"], name="t1", perm=[1, 0]),
        helper.make_node("MatMul", ["X", "W1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Cast", ["W2t"], ["W2tf"], name="c2", to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["W2tf"], ["W2"], name="t2", perm=[1, 0]),
        helper.make_node("MatMul", ["r", "W2"], ["Y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes, "chained", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 32])],
        [numpy_helper.from_array(w1t, "W1t"), numpy_helper.from_array(w2t, "W2t")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_revert_through_transpose_and_cast_chains(tmp_path):
    rng = np.random.default_rng(3)
    dense = _chained_mlp(tmp_path / "mlp.onnx", rng)
    result = compile_model(dense, CompileOptions(output=str(tmp_path / "mlp.sparse.onnx"), perm_steps=300))
    assert any(p.folded for p in result.permutations)  # mm1's rows are permuted for mm2
    x = rng.standard_normal((64, 32)).astype(np.float32)
    res = revert_dense_weights(result.output_path, dense, ["mm2"], tmp_path / "r.onnx")
    assert res.layers == ["mm2"]
    stored = {i.name: numpy_helper.to_array(i) for i in onnx.load(tmp_path / "r.onnx").graph.initializer}
    sparse_stored = {i.name: numpy_helper.to_array(i) for i in onnx.load(result.output_path).graph.initializer}
    name = next(n for n in stored if n.startswith("W2t"))
    assert (stored[name] != 0).all() and (sparse_stored[name] == 0).mean() == pytest.approx(0.5)
    assert stored[name].dtype == np.float64  # written in the stored dtype, behind the Cast
    reference = run(_dense_with_others_sparse(result, "mm2", tmp_path / "ref.onnx"), x)
    np.testing.assert_allclose(run(tmp_path / "r.onnx", x), reference, rtol=0, atol=1e-5)
    revert_dense_weights(result.output_path, dense, ["mm1", "mm2"], tmp_path / "all.onnx")
    np.testing.assert_allclose(run(tmp_path / "all.onnx", x), run(dense, x), rtol=1e-5, atol=1e-5)
