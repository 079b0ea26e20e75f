"""The modeled speedup: conv activation traffic, precision, several shape sets, the fitted curve."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mpcompile.analyze import AnalyzeOptions, analyze_model
from mpcompile.io.shapes import ShapeSpec
from mpcompile.trt.speedup import layer_shapes
from mpcompile.trt.model import GPUS, LayerShape, predict_sparse_pick


def _conv3x3(path, cin=64, cout=64, hw=56):
    w = np.random.default_rng(0).standard_normal((cout, cin, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    graph = helper.make_graph([node], "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", cin, hw, hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", cout, hw, hw])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_conv_roofline_reads_the_input_tensor_once(tmp_path):
    analysis = analyze_model(_conv3x3(tmp_path / "c.onnx"), ShapeSpec(dims={"batch": 1}), AnalyzeOptions(annotate=False))
    (shape,) = layer_shapes(analysis.result.layers, {"conv"}, analysis.shapes)
    assert (shape.m, shape.k, shape.n) == (56 * 56, 576, 64)
    # by hand: 2·3136·576·64 FLOP over 2 bytes × (input 64·56·56 + weight 576·64 + output 64·56·56)
    flops = 2 * 3136 * 576 * 64
    dense_bytes = 2 * (64 * 56 * 56 + 576 * 64 + 64 * 56 * 56)
    assert shape.flops == flops and shape.dense_bytes() == dense_bytes
    assert shape.intensity() == pytest.approx(263.78, abs=0.01)
    # the im2col count (M·K input bytes) gave 56.6 FLOP/B: memory bound on an A100 (balance 153)
    im2col = LayerShape("conv", 3136, 576, 64)
    assert im2col.intensity() == pytest.approx(56.56, abs=0.01)
    a100 = GPUS["A100-SXM4-80GB"]
    assert im2col.intensity() < a100.balance_flop_per_byte < shape.intensity()
    picked, reason = predict_sparse_pick(shape, a100, min_channels=64)
    assert picked, reason
    # without the analysed shapes a stride-1 conv falls back to M·Cin, the same count here
    (fallback,) = layer_shapes(analysis.result.layers, {"conv"})
    assert fallback.input_elements == 64 * 56 * 56


def test_precision_decides_the_gain():
    big = LayerShape("fc", 4096, 4096, 4096)
    a100 = GPUS["A100-SXM4-80GB"]
    from mpcompile.trt.model import gemm_time_us, model_speedup

    fp16 = model_speedup([big], a100, other_fraction=0.0, precision="fp16")
    fp32 = model_speedup([big], a100, other_fraction=0.0, precision="fp32")
    int8 = model_speedup([big], a100, other_fraction=0.0, precision="int8")
    assert fp16.speedup == pytest.approx(2.0) and int8.speedup == pytest.approx(2.0)  # compute bound
    assert fp32.speedup == 1.0 and fp32.precision == "fp32"
    assert "--fp16" in fp32.per_layer[0].pick_reason
    # FP32 runs TF32 tensor cores at half the FP16 rate: twice the FP16 dense time when compute bound
    assert gemm_time_us(big, a100, False, "fp32") == pytest.approx(2 * gemm_time_us(big, a100, False, "fp16"))
    # INT8 2:4 weight: half of 1-byte values + 2-bit metadata per kept value = 0.625 B/element
    one_row = LayerShape("gemv", 1, 4096, 4096)
    assert gemm_time_us(one_row, a100, True, "int8") * 1e-6 * a100.bandwidth_gbs * 1e9 == pytest.approx(
        4096 + 4096 + 0.625 * 4096 * 4096)


def test_dim_lists_expand_to_shape_sets():
    from mpcompile.errors import UsageError
    from mpcompile.io.shapes import expand_dim_sets

    assert expand_dim_sets(["batch=1,8,32", "seq=128"]) == [["batch=1", "seq=128"], ["batch=8", "seq=128"],
                                                             ["batch=32", "seq=128"]]
    assert expand_dim_sets(None) == [[]]
    with pytest.raises(UsageError, match="batch=1,x"):
        expand_dim_sets(["batch=1,x"])


def _mlp(path, width=1024):
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((width, width)) / 32).astype(np.float32)
    w2 = (rng.standard_normal((width, width)) / 32).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_shape_sets_give_one_row_per_set_and_gpu(tmp_path):
    from mpcompile.trt.speedup import shape_set_speedups

    specs = [ShapeSpec(dims={"batch": b}) for b in (1, 8, 4096)]
    analysis = analyze_model(_mlp(tmp_path / "m.onnx"), specs[0], AnalyzeOptions(annotate=False))
    rows = shape_set_speedups(analysis, {"fc1", "fc2"}, specs, "fp16")
    assert [(r["shapes"].split(",")[0], r["gpu"]) for r in rows] == [
        (f"batch={b}", g) for b in (1, 8, 4096) for g in ("A40", "A100-SXM4-80GB")]
    assert [r["per_layer"][0]["m"] for r in rows[::2]] == [1, 8, 4096]
    # one row is memory bound (TensorRT keeps dense: 1.00×); 4096 rows are compute bound
    assert rows[0]["speedup"] == 1.0 and rows[-1]["speedup"] > 1.3
    assert all(r["precision"] == "fp16" and r["kind"] == "modeled" for r in rows)


def test_build_without_tensorrt_models_the_stored_precision(tmp_path):
    import json
    import subprocess
    import sys

    from mpcompile.pipeline import CompileOptions, compile_model

    dense = _mlp(tmp_path / "m.onnx", width=512)
    for fp16 in (False, True):
        out = tmp_path / f"m{int(fp16)}.sparse.onnx"
        compile_model(dense, CompileOptions(output=str(out), fp16=fp16, perm_steps=20, method="magnitude"))
        proc = subprocess.run([sys.executable, "-m", "mpcompile", "build", str(out), "--dim", "batch=1,4096"],
                              capture_output=True, text=True)
        assert proc.returncode == 6, proc.stderr
        report = json.loads(out.with_suffix(".build.json").read_text())
        rows = report["speedup"]
        assert len(rows) == 4 and {r["precision"] for r in rows} == {"fp16" if fp16 else "fp32"}
        big = [r for r in rows if r["shapes"].startswith("batch=4096")]
        if fp16:
            assert all(r["speedup"] > 1.05 and "fp16_speedup" not in r for r in big)
        else:
            assert all(r["speedup"] == 1.0 and r["fp16_speedup"] > 1.05 for r in big)
            assert "if emitted as FP16" in proc.stdout


def test_efficiency_curve_fit_recovers_known_maps_and_matches_shipped_constants():
    import json
    from pathlib import Path

    from mpcompile.trt.efficiency import CURVES, MeasuredGemm, fit_curve
    from mpcompile.trt.model import gemm_time_us

    h100 = GPUS["H100-SXM"]
    shapes = [LayerShape(f"s{m}", m, k, n) for m in (1, 64, 4096) for k, n in ((256, 256), (1024, 4096))]
    synthetic = [MeasuredGemm(s, 1.5 * gemm_time_us(s, h100, False) + 3.0, 2.0 * gemm_time_us(s, h100, True) + 7.0)
                 for s in shapes]
    curve = fit_curve(h100, synthetic, "synthetic")
    assert (curve.dense_scale, curve.dense_overhead_us) == (pytest.approx(1.5), pytest.approx(3.0))
    assert (curve.sparse_scale, curve.sparse_overhead_us) == (pytest.approx(2.0), pytest.approx(7.0))
    # the shipped H100 curve is the fit of our audit, and predicts its ViT-B/16 batch-128 GEMMs
    audit = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results"
                        / "gpu_audit_nvidia_h100_80gb_hbm3.json").read_text())
    points = [MeasuredGemm(LayerShape(p["name"], p["rows"], p["in_features"], p["out_features"]),
                           p["dense"]["median_ms"] * 1e3, p["sparse"]["median_ms"] * 1e3)
              for p in audit["per_shape"] if p["error"] is None]
    fitted, shipped = fit_curve(h100, points, "audit"), CURVES["H100-SXM"]
    assert shipped.sparse_scale == pytest.approx(fitted.sparse_scale, rel=1e-3)
    assert shipped.dense_overhead_us == pytest.approx(fitted.dense_overhead_us, rel=1e-3)
    big = next(p for p in points if (p.shape.m, p.shape.k, p.shape.n) == (25216, 768, 3072))
    assert shipped.kernel_speedup(big.shape, h100) == pytest.approx(big.speedup, rel=0.1)
    # the plain roofline is the 1.4-2x that misled: far off this measured point
    roofline = gemm_time_us(big.shape, h100, False) / gemm_time_us(big.shape, h100, True)
    assert roofline > 1.5 * big.speedup


def test_build_timing_inputs_are_legal_token_ids(tmp_path):
    import argparse

    from mpcompile.commands.build import _engine_inputs

    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32), "emb")
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["h"], name="gather")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
                              [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", "seq", 16])], [table])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "g.onnx")
    args = argparse.Namespace(model=str(tmp_path / "g.onnx"), shape=None, dim=["batch=4", "seq=128"], default_dim=1)
    ids = _engine_inputs(args)["ids"]
    assert ids.shape == (4, 128) and ids.dtype == np.int64 and 0 <= ids.min() and ids.max() < 50


def test_inspector_reads_trt85_allow_sparse_key():
    from mpcompile.trt.inspector import _layer

    assert _layer({"Name": "fc", "AllowSparse": 1}).has_sparse_weights is True
    assert _layer({"Name": "fc", "AllowSparse": 0}).has_sparse_weights is False
    assert _layer({"Name": "fc", "HasSparseWeights": 1}).has_sparse_weights is True
    assert _layer({"Name": "fc"}).has_sparse_weights is None
