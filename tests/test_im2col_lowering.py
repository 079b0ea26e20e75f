"""LowerConvToIm2colPass: exactness against ONNX Runtime's Conv, column order, 2:4 legality."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mpcompile.checks.checker import SPARSITY_KEY, check_model
from mpcompile.io.model_io import load_model, save_model
from mpcompile.numerics.im2col import im2col_rows
from mpcompile.passes.im2col_lowering import LowerConvToIm2colPass

RNG = np.random.default_rng(7)

# (name, cin, cout, kernel, pads (t, l, b, r), strides, dilations, (H, W))
GEOMETRIES = [
    ("k3p1s1", 8, 16, (3, 3), (1, 1, 1, 1), (1, 1), (1, 1), (8, 8)),
    ("k3p0s2", 8, 12, (3, 3), (0, 0, 0, 0), (2, 2), (1, 1), (9, 9)),
    ("k3p2d2", 8, 8, (3, 3), (2, 2, 2, 2), (1, 1), (2, 2), (8, 8)),
    ("k1s1", 16, 8, (1, 1), (0, 0, 0, 0), (1, 1), (1, 1), (6, 6)),
    ("asym_pads", 4, 8, (3, 3), (1, 0, 2, 1), (1, 1), (1, 1), (7, 7)),
    ("k5x5", 8, 8, (5, 5), (2, 2, 2, 2), (1, 1), (1, 1), (9, 9)),
    ("nonsquare", 8, 8, (3, 2), (1, 0, 1, 1), (2, 1), (1, 2), (7, 12)),
    ("k1s2", 8, 8, (1, 1), (0, 0, 0, 0), (2, 2), (1, 1), (7, 7)),
]


def conv_model(cin, cout, kernel, pads, strides, dilations, hw, *, bias=True, group=1,
               auto_pad=None, spatial_dims=None, weight=None, opset=17) -> onnx.ModelProto:
    """One Conv with dynamic batch, built with onnx.helper (independent of the exporters)."""
    w = weight if weight is not None else (
        RNG.standard_normal((cout, cin // group, *kernel)) / np.sqrt(cin * np.prod(kernel))
    ).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")]
    inputs = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(RNG.standard_normal(cout).astype(np.float32), "B"))
        inputs.append("B")
    attrs = {"strides": list(strides), "dilations": list(dilations), "group": group}
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = list(pads)
    node = helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)
    dims = spatial_dims or list(hw)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, *dims])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cout, "OH", "OW"])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def lower(proto: onnx.ModelProto, **kw) -> tuple[onnx.ModelProto, LowerConvToIm2colPass]:
    model = ir.serde.deserialize_model(proto)
    pass_ = LowerConvToIm2colPass(**kw)
    result = pass_(model)
    assert result.model is model
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out, full_check=True)
    return out, pass_


def run(proto: onnx.ModelProto, x: np.ndarray, outputs=None) -> list[np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, {session.get_inputs()[0].name: x})


def op_types(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


def assert_same_as_conv(original, lowered, cin, hw, batches=(1, 3)):
    for batch in batches:  # the same lowered model must serve several batch sizes
        x = RNG.standard_normal((batch, cin, *hw)).astype(np.float32)
        expected = run(original, x)[0]
        got = run(lowered, x)[0]
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("geo", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_lowered_conv_matches_ort_conv(geo):
    _, cin, cout, kernel, pads, strides, dilations, hw = geo
    original = conv_model(cin, cout, kernel, pads, strides, dilations, hw)
    lowered, pass_ = lower(original)
    assert "Conv" not in op_types(lowered)
    assert op_types(lowered).count("MatMul") == 1
    assert [c.name for c in pass_.lowered] == ["conv"] and pass_.skipped == []
    # the old 4-D weight is gone; the new one is [kh·kw·Cin, Cout]
    shapes = {t.name: tuple(t.dims) for t in lowered.graph.initializer}
    assert "W" not in shapes
    assert shapes[pass_.lowered[0].weight.name] == (kernel[0] * kernel[1] * cin, cout)
    assert lowered.graph.output[0].name == "y"
    assert_same_as_conv(original, lowered, cin, hw)


def test_conv_without_bias_has_no_add():
    original = conv_model(8, 8, (3, 3), (1, 1, 1, 1), (1, 1), (1, 1), (6, 6), bias=False)
    lowered, _ = lower(original)
    assert "Add" not in op_types(lowered)
    assert_same_as_conv(original, lowered, 8, (6, 6))


def test_dynamic_spatial_size_uses_shape_ops():
    original = conv_model(8, 8, (3, 3), (1, 0, 2, 1), (2, 1), (1, 2), (9, 10),
                          spatial_dims=["H", "W"])
    lowered, _ = lower(original)
    assert "Shape" in op_types(lowered)
    for hw in ((9, 10), (12, 7)):
        assert_same_as_conv(original, lowered, 8, hw, batches=(2,))


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_auto_pad_with_static_size(auto_pad):
    original = conv_model(8, 8, (4, 3), None, (2, 1), (1, 1), (9, 8), auto_pad=auto_pad)
    lowered, pass_ = lower(original)
    assert pass_.lowered
    assert_same_as_conv(original, lowered, 8, (9, 8))


def test_same_padding_with_dynamic_size_is_refused_with_reason():
    original = conv_model(8, 8, (3, 3), None, (1, 1), (1, 1), (8, 8), auto_pad="SAME_UPPER",
                          spatial_dims=["H", "W"])
    lowered, pass_ = lower(original)
    assert op_types(lowered) == ["Conv"]
    assert len(pass_.skipped) == 1 and "dynamic spatial" in pass_.skipped[0][1]


def test_grouped_conv_is_skipped_with_reason():
    original = conv_model(8, 8, (3, 3), (1, 1, 1, 1), (1, 1), (1, 1), (6, 6), group=2)
    model = ir.serde.deserialize_model(original)
    pass_ = LowerConvToIm2colPass()
    result = pass_(model)
    assert not result.modified
    assert [n.op_type for n in model.graph] == ["Conv"]
    assert pass_.skipped == [("conv", "grouped conv (group=2): im2col needs one GEMM per group")]


def test_columns_are_ordered_kh_kw_cin_like_the_numpy_reference():
    cin, kernel, pads, strides, dilations, hw = 8, (3, 2), (1, 0, 2, 1), (2, 1), (1, 2), (7, 9)
    original = conv_model(cin, 8, kernel, pads, strides, dilations, hw)
    lowered, pass_ = lower(original)
    rows_name = pass_.lowered[0].matmul.inputs[0].name
    x = RNG.standard_normal((2, cin, *hw)).astype(np.float32)
    session = ort.InferenceSession(
        _with_extra_output(lowered, rows_name).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    rows = session.run([rows_name], {"x": x})[0]
    reference = im2col_rows(x, kernel, strides=strides, pads=pads, dilations=dilations)
    assert rows.shape == (2, reference.shape[0] // 2, reference.shape[1])
    np.testing.assert_array_equal(rows.reshape(reference.shape), reference)  # pure data movement


def _with_extra_output(proto: onnx.ModelProto, name: str) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    out.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return out


def test_only_the_given_nodes_are_lowered():
    w = (RNG.standard_normal((8, 8, 3, 3)) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["h"], name="first", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Conv", ["r", "W"], ["y"], name="second", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 6, 6])],
        [numpy_helper.from_array(w, "W")],
    )
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = ir.serde.deserialize_model(original)
    second = next(n for n in model.graph if n.name == "second")
    assert LowerConvToIm2colPass([second])(model).modified
    lowered = ir.serde.serialize_model(model)
    onnx.checker.check_model(lowered, full_check=True)
    assert [n.name for n in lowered.graph.node if n.op_type == "Conv"] == ["first"]
    # W is still read by the first conv, so it must survive
    assert "W" in {t.name for t in lowered.graph.initializer}
    assert_same_as_conv(original, lowered, 8, (6, 6))


def test_fp16_conv_keeps_its_dtype():
    original = conv_model(8, 8, (3, 3), (1, 1, 1, 1), (1, 1), (1, 1), (6, 6))
    proto16 = onnx.ModelProto()
    proto16.CopyFrom(original)
    for init in proto16.graph.initializer:
        arr = numpy_helper.to_array(init).astype(np.float16)
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
    for v in (*proto16.graph.input, *proto16.graph.output):
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    lowered, pass_ = lower(proto16)
    assert pass_.lowered[0].weight.dtype == ir.DataType.FLOAT16
    x = RNG.standard_normal((2, 8, 6, 6)).astype(np.float16)
    np.testing.assert_allclose(run(lowered, x)[0].astype(np.float32),
                               run(proto16, x)[0].astype(np.float32), atol=2e-2)


# ----------------------------------------------------------------------------- torch exports

torch = pytest.importorskip("torch")


class TwoConvs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.b = torch.nn.Conv2d(16, 16, 5, padding=4, dilation=2, bias=False)
        self.dw = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)

    def forward(self, x):
        return self.dw(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_torch_exported_convs_lower_exactly(export, dynamo):
    module = TwoConvs()
    path = export(module, (torch.randn(2, 8, 10, 12),), dynamo=dynamo)
    original = onnx.load(str(path))
    lowered, pass_ = lower(original)
    assert len(pass_.lowered) == 2
    assert len(pass_.skipped) == 1 and "group=16" in pass_.skipped[0][1]
    assert op_types(lowered).count("Conv") == 1  # the depthwise conv stays
    for batch in (1, 3):
        x = torch.randn(batch, 8, 10, 12)
        with torch.no_grad():
            expected = module(x).numpy()
        got = run(lowered, x.numpy())[0]
        np.testing.assert_allclose(got, run(original, x.numpy())[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- 2:4 legality


def prune_24_along_cin(w: np.ndarray) -> np.ndarray:
    """TensorRT conv order: per (cout, kh, kw), keep the 2 largest of every 4 input channels."""
    moved = np.moveaxis(w.copy(), 1, -1)  # [Cout, kh, kw, Cin]
    groups = moved.reshape(-1, 4)
    drop = np.argsort(np.abs(groups), axis=1)[:, :2]
    np.put_along_axis(groups, drop, 0.0, axis=1)
    return np.moveaxis(groups.reshape(moved.shape), -1, 1)


def prune_24_flat(w: np.ndarray) -> np.ndarray:
    """The *illegal* grouping: 4 consecutive entries of the flattened [Cin][kh][kw] row."""
    flat = w.reshape(w.shape[0], -1).copy()
    groups = flat.reshape(-1, 4)
    drop = np.argsort(np.abs(groups), axis=1)[:, :2]
    np.put_along_axis(groups, drop, 0.0, axis=1)
    return groups.reshape(w.shape)


def _lowered_check(tmp_path, weight):
    original = conv_model(16, 16, (3, 3), (1, 1, 1, 1), (1, 1), (1, 1), (6, 6), weight=weight)
    original.graph.node[0].metadata_props.add(key=SPARSITY_KEY, value="2:4")
    model = ir.serde.deserialize_model(original)
    assert LowerConvToIm2colPass()(model).modified
    path = save_model(model, tmp_path / "lowered.onnx")
    report = check_model(path)
    (layer,) = report.layers
    return original, path, layer, report


def test_24_conv_weight_stays_legal_after_lowering(tmp_path):
    weight = prune_24_along_cin(RNG.standard_normal((16, 16, 3, 3)).astype(np.float32))
    original, path, layer, report = _lowered_check(tmp_path, weight)
    assert layer.op == "MatMul" and layer.marked and layer.legal and report.ok
    assert layer.shape == (16, 144) and layer.density == pytest.approx(0.5)
    lowered = load_model(path).model
    matmul = next(n for n in lowered.graph if n.op_type == "MatMul")
    assert matmul.metadata_props[SPARSITY_KEY] == "2:4"
    assert matmul.metadata_props["mpcompile.lowered_from"] == "Conv:conv"
    assert_same_as_conv(original, onnx.load(str(path)), 16, (6, 6))


def test_wrongly_grouped_conv_weight_is_caught_after_lowering(tmp_path):
    """Control: 2:4 along the flattened [Cin][kh][kw] row is not TensorRT-legal, lowered or not."""
    weight = prune_24_flat(RNG.standard_normal((16, 16, 3, 3)).astype(np.float32))
    _, _, layer, report = _lowered_check(tmp_path, weight)
    assert layer.marked and not layer.legal and not report.ok
    assert layer.violating_groups > 0
