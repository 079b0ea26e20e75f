"""Odd but real exports (issue 11 parts 2 and 5): Paddle's ``-1`` dims, int64 token inputs,
scalar inputs, several outputs, degenerate outputs and shapes taken from --calib data.

Models are built with ``onnx.helper`` the way Paddle/TF converters write them, so each test
exercises exactly the construct it names and runs in well under a second.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mpcompile.io.calibration import synthetic_inputs
from mpcompile.cli import main
from mpcompile.errors import UsageError
from mpcompile.pipeline import CompileOptions, compile_model
from mpcompile.io.shapes import ShapeSpec
from mpcompile.checks.validate import compare_all_outputs, degenerate_reason

RNG = np.random.default_rng(0)


def _w(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32) * 0.1, name)


def _save(graph: onnx.GraphProto, path) -> str:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def paddle_classifier(path, *, two_outputs: bool = False, scale: float = 1.0) -> str:
    """x[-1, 64] → MatMul(Identity(W1)) → Relu → MatMul → logits (and softmax), Paddle-style."""
    nodes = [
        helper.make_node("Identity", ["w1"], ["w1_id"]),
        helper.make_node("MatMul", ["x", "w1_id"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["z"]),
        helper.make_node("Mul", ["z", "scale"], ["logits"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [-1, 32])]
    if two_outputs:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=-1))
        outputs.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, [-1, 32]))
    graph = helper.make_graph(
        nodes, "paddle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 64])], outputs,
        [_w("w1", 64, 64), _w("w2", 64, 32), numpy_helper.from_array(np.float32(scale), "scale")],
    )
    return _save(graph, path)


def test_paddle_minus_one_batch_compiles(tmp_path):
    """Was: internal error 'need at least one array to concatenate' in run_model."""
    model = paddle_classifier(tmp_path / "paddle.onnx")
    result = compile_model(model, CompileOptions(output=str(tmp_path / "out.onnx"), permute=False))
    assert result.check_ok
    assert result.validation.samples == CompileOptions().synthetic_samples
    assert len(result.selection.selected_names) == 2


def test_zero_and_negative_dims_are_dynamic():
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [0, -1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 64])], [_w("w", 64, 64)],
    )
    model = load_model_from_graph(graph)
    data = synthetic_inputs(model, ShapeSpec(default=3), samples=5)
    assert data.inputs["x"].shape == (5, 3, 64)
    assert data.static_batch is None


def load_model_from_graph(graph):
    import onnx_ir as ir

    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _token_model(*, with_table: bool = True):
    """ids → Cast → Unsqueeze → Gather(table) ... the way TF converters feed an embedding."""
    nodes = [helper.make_node("Cast", ["ids"], ["ids32"], to=TensorProto.INT32)]
    inits = [_w("table", 50, 64), _w("w", 64, 64), numpy_helper.from_array(np.array([0], np.int64), "ax")]
    if with_table:
        nodes.append(helper.make_node("Gather", ["table", "ids32"], ["emb"]))
    else:  # ids used as data: no table says what is legal
        nodes += [helper.make_node("Cast", ["ids32"], ["idsf"], to=TensorProto.FLOAT),
                  helper.make_node("Unsqueeze", ["idsf", "m1"], ["u"]),
                  helper.make_node("Expand", ["u", "shape"], ["emb"])]
        inits += [numpy_helper.from_array(np.array([-1], np.int64), "m1"),
                  numpy_helper.from_array(np.array([1, 1, 64], np.int64), "shape")]
    nodes += [
        helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "m1b"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("Gather", ["pos_table", "position_ids"], ["pos"]),
        helper.make_node("Add", ["masked", "pos"], ["h"]),
        helper.make_node("MatMul", ["h", "w"], ["y"]),
    ]
    inits += [numpy_helper.from_array(np.array([-1], np.int64), "m1b"), _w("pos_table", 16, 64)]
    graph = helper.make_graph(
        nodes, "tokens",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 64])], inits,
    )
    return graph


def test_token_ids_are_drawn_below_the_table_they_index_through_casts():
    model = load_model_from_graph(_token_model())
    data = synthetic_inputs(model, ShapeSpec(dims={"seq": 12}), samples=64)
    ids = data.inputs["ids"]
    assert ids.shape == (64, 12) and ids.dtype == np.int64
    assert 0 <= ids.min() and ids.max() < 50 and ids.max() > 25  # the range is used, not 0..1
    assert np.all(data.inputs["mask"] == 1)
    np.testing.assert_array_equal(data.inputs["position_ids"][3], np.arange(12))


def test_integer_input_without_a_legal_range_asks_for_calib(tmp_path):
    path = _save(_token_model(with_table=False), tmp_path / "free_ids.onnx")
    with pytest.raises(UsageError, match=r"integer input 'ids'.*--calib"):
        compile_model(path, CompileOptions(output=str(tmp_path / "o.onnx")))


def test_scalar_input_is_shared_by_all_samples(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Mul", ["h", "t"], ["y"])], "scalar",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64]),
         helper.make_tensor_value_info("t", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])], [_w("w", 64, 64)],
    )
    path = _save(graph, tmp_path / "scalar.onnx")
    result = compile_model(path, CompileOptions(output=str(tmp_path / "o.onnx"), permute=False))
    assert result.check_ok and result.validation.samples == 1


def test_every_output_is_validated_and_named(tmp_path):
    model = paddle_classifier(tmp_path / "two.onnx", two_outputs=True)
    result = compile_model(model, CompileOptions(output=str(tmp_path / "o.onnx"), permute=False))
    assert [c.output for c in result.validation.all_outputs] == ["logits", "probs"]
    assert all(c.degenerate is None and 0.5 < c.cosine_similarity <= 1.0 for c in result.validation.all_outputs)
    report = result.to_dict()["validation"]
    assert report["others"][0]["output"] == "probs"


def test_degenerate_dense_output_is_flagged_not_quoted(tmp_path, capsys):
    model = paddle_classifier(tmp_path / "tiny.onnx", scale=1e-9)  # outputs ~1e-9: a detector on noise
    code = main([model, "-o", str(tmp_path / "o.onnx"), "--no-permute", "--report", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0
    assert "not meaningful" in out and "~0 on this data" in out
    assert "cosine" not in out
    for written in ("r.md", "r.html"):  # the reports say the same, for every output
        text = (tmp_path / written).read_text()
        assert "not meaningful, the dense output is ~0" in text, written
        assert "cosine" not in text, written


def test_degenerate_reason_thresholds():
    assert degenerate_reason(np.full((4, 3), 2.5)) .startswith("the dense output is constant")
    assert degenerate_reason(np.full((4, 3), 1e-9)).startswith("the dense output is ~0")
    assert degenerate_reason(np.array([[np.nan, 1.0]])) == "the dense output holds NaN/Inf"
    assert degenerate_reason(RNG.standard_normal((4, 3))) is None
    ints = compare_all_outputs(["a", "b"], [np.ones((2, 3)), np.arange(6).reshape(2, 3)],
                               [np.ones((2, 3)), np.arange(6).reshape(2, 3)])
    assert ints.degenerate and ints.others[0].degenerate is None and ints.others[0].max_abs_error == 0


def test_calib_dims_set_the_analysed_shapes(tmp_path):
    """128-token calibration sequences: MACs at seq=128, stated in the report, not at seq=1."""
    path = _save(_token_model(), tmp_path / "tok.onnx")
    ids = RNG.integers(0, 50, size=(8, 16)).astype(np.int64)
    calib = tmp_path / "calib.npz"
    np.savez(calib, ids=ids, mask=np.ones_like(ids), position_ids=np.broadcast_to(np.arange(16), ids.shape))
    report = tmp_path / "r.json"
    code = main([path, "-o", str(tmp_path / "o.onnx"), "--calib", str(calib), "--report", str(report)])
    assert code == 0
    data = json.loads(report.read_text())
    assert "seq=16" in data["shapes"]
    layer = next(layer for layer in data["layers"] if layer["macs"] is not None)
    assert layer["macs"] == 16 * 64 * 64  # batch 1 (default) × seq 16 × K × N


def test_analyze_does_not_claim_an_eligible_fraction_over_unknown_macs(tmp_path, capsys):
    """A GEMM behind a runtime-shaped Reshape: its MACs stay unknown, so no '% eligible'."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]),
         helper.make_node("Reshape", ["h", "shape"], ["r"]),  # shape is an input: unknown statically
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "unknown",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", 64])], [_w("w1", 64, 64), _w("w2", 64, 64)],
    )
    path = _save(graph, tmp_path / "unknown.onnx")
    assert main(["analyze", path]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "GEMM MACs 4.1k known; 1 of 2 layers with unknown MACs" in out
    assert "% eligible" not in out


def test_tf_style_reshaped_constant_weight_is_found_and_compiled(tmp_path):
    """const_fold_opt__ weights stored flat and reshaped at run time (TF/Paddle converters)."""
    w = RNG.standard_normal((64, 64)).astype(np.float32) * 0.1
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["const_fold_opt__12", "shape"], ["w"]),
         helper.make_node("Identity", ["w"], ["w_id"]),
         helper.make_node("MatMul", ["x", "w_id"], ["y"])], "tf",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 64])],
        [numpy_helper.from_array(w.reshape(-1), "const_fold_opt__12"),
         numpy_helper.from_array(np.array([64, 64], np.int64), "shape")],
    )
    path = _save(graph, tmp_path / "tf.onnx")
    from mpcompile.analyze import weights_to_analyze
    from mpcompile.io.model_io import load_model

    assert weights_to_analyze(load_model(path)) == 1  # the progress bar's total counts it too
    result = compile_model(path, CompileOptions(output=str(tmp_path / "o.onnx"), permute=False))
    assert len(result.analysis.result.layers) == 1 and len(result.selection.selected_names) == 1
    assert result.check_ok and result.validation.relative_l2 < 1.0
    out = onnx.load(str(tmp_path / "o.onnx"))
    assert [n.op_type for n in out.graph.node] == ["Identity", "MatMul"]
    stored = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "w"))
    assert np.all((stored.T.reshape(64, 16, 4) != 0).sum(axis=-1) <= 2)  # 2:4 along K


def test_kv_cache_input_without_leading_batch_is_fed_whole():
    """past [layers=2, batch, heads, past, dim]: its first dim is not the sample axis."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "kv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64]),
         helper.make_tensor_value_info("past", TensorProto.FLOAT, [2, "batch", 4, "past", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])], [_w("w", 64, 64)],
    )
    data = synthetic_inputs(load_model_from_graph(graph), ShapeSpec(dims={"past": 8}), samples=16)
    assert data.shared == {"past"} and data.samples == 1
    assert data.inputs["past"].shape == (2, 1, 4, 8, 16) and data.inputs["x"].shape == (1, 64)
    batch = next(data.batches(8))
    assert batch["past"].shape == (2, 1, 4, 8, 16)


def batch_one_reshape_model(path) -> str:
    """ViT-B/16's dynamo export in miniature: the batch is declared dynamic, the sequence-first
    tensor ``[4, batch, 32]`` is then reshaped to ``[4, 32]``, legal only at batch 1."""
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]),
        helper.make_node("Reshape", ["t", "rows"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["z"]),
        helper.make_node("Reshape", ["z", "out_shape"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "batch_one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        [_w("w1", 32, 32), _w("w2", 32, 16), numpy_helper.from_array(np.array([4, 32], np.int64), "rows"),
         numpy_helper.from_array(np.array([1, 64], np.int64), "out_shape")],
    )
    return _save(graph, path)


def test_export_stuck_at_batch_one_runs_one_sample_at_a_time(tmp_path):
    """Was (conformance, dynamo ViT-B/16): exit 3 'ONNX Runtime cannot run the input model'."""
    model = batch_one_reshape_model(tmp_path / "b1.onnx")
    result = compile_model(model, CompileOptions(output=str(tmp_path / "out.onnx"), method="sparsegpt"))
    assert result.check_ok
    assert result.validation.samples == CompileOptions().synthetic_samples
    assert any("runs it only at batch 1" in note for note in result.notes)
    assert len(result.selection.selected_names) == 2
    assert result.validation.cosine_similarity > 0.5  # real per-sample outputs, compared sample by sample


def test_batch_one_fallback_keeps_real_runtime_errors(tmp_path):
    """A model that fails even on one sample still gets the one-line exit-3 error."""
    path = batch_one_reshape_model(tmp_path / "b1.onnx")
    proto = onnx.load(path)
    proto.graph.initializer[2].CopyFrom(numpy_helper.from_array(np.array([5, 32], np.int64), "rows"))
    onnx.save(proto, path)
    assert main(["compile", path, "-o", str(tmp_path / "out.onnx")]) == 3
