"""The modeled speedup: conv activation traffic, precision, several shape sets, the fitted curve."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mpcompile.analyze import AnalyzeOptions, analyze_model
from mpcompile.shapes import ShapeSpec
from mpcompile.speedup import layer_shapes, modeled_speedups
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
