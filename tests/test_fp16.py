"""ConvertToFloat16Pass on torch exports (MLP, transformer block, CNN) and hand-built graphs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mpcompile.checks.checker import SPARSITY_KEY, check_model
from mpcompile.io.model_io import save_model
from mpcompile.passes.fp16 import FP16_MAX, ConvertToFloat16Pass
from mpcompile.passes.gemm_discovery import discover_gemms

from conftest import export_torch

torch = pytest.importorskip("torch")
FLOAT, FLOAT16 = ir.DataType.FLOAT, ir.DataType.FLOAT16


def session(proto: onnx.ModelProto) -> ort.InferenceSession:
    # ORT 1.32 CPU segfaults on an FP16 Transpose→MatMul at ORT_ENABLE_ALL (TransposeOptimizer +
    # MatmulTransposeFusion); EXTENDED has every fusion that matters for a correctness run.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return ort.InferenceSession(proto.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def run(proto: onnx.ModelProto, *arrays: np.ndarray) -> list[np.ndarray]:
    s = session(proto)
    return s.run(None, {i.name: a for i, a in zip(s.get_inputs(), arrays)})


def convert(proto: onnx.ModelProto, **kw) -> tuple[onnx.ModelProto, ir.Model, ConvertToFloat16Pass]:
    model = ir.serde.deserialize_model(proto)
    pass_ = ConvertToFloat16Pass(**kw)
    result = pass_(model)
    assert result.modified and result.model is model
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out, full_check=True)
    return out, model, pass_


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - expected) / np.linalg.norm(expected))


# ----------------------------------------------------------------------------- torch models


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
            torch.nn.Linear(64, 10),
        )

    def forward(self, x):
        return self.net(x)


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = torch.nn.LayerNorm(32)
        self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=True)
        self.ln2 = torch.nn.LayerNorm(32)
        self.fc1 = torch.nn.Linear(32, 64)
        self.fc2 = torch.nn.Linear(64, 32)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


class CNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2), torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        )
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(x))


CASES = {"mlp": (MLP, (4, 32)), "block": (Block, (2, 8, 32)), "cnn": (CNN, (2, 3, 12, 12))}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each model exported once per exporter for the whole module (exports dominate run time)."""
    folder = tmp_path_factory.mktemp("fp16")
    cache: dict[tuple[str, bool], tuple[torch.nn.Module, onnx.ModelProto]] = {}

    def get(name: str, dynamo: bool):
        if (name, dynamo) not in cache:
            cls, shape = CASES[name]
            torch.manual_seed(0)
            module = cls().eval()
            if name == "cnn":  # non-trivial running stats, so BatchNorm does something
                bn = module.features[1]
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
            path = folder / f"{name}{int(dynamo)}.onnx"
            export_torch(module, (torch.randn(*shape),), path, dynamo=dynamo)
            cache[name, dynamo] = (module, onnx.load(str(path)))
        return cache[name, dynamo]

    return get


# every model through the legacy exporter; the dynamo exporter (slow to run) for the block
# (LayerNormalization / Softmax as single ops) and the CNN (BatchNormalization kept as an op)
EXPORTS = [("mlp", False), ("block", False), ("cnn", False), ("block", True), ("cnn", True)]


EXPORT_IDS = [f"{n}-{'dynamo' if d else 'legacy'}" for n, d in EXPORTS]


@pytest.mark.parametrize(("name", "dynamo"), EXPORTS, ids=EXPORT_IDS)
def test_torch_models_run_in_fp16_close_to_fp32(exported, name, dynamo):
    module, proto = exported(name, dynamo)
    out, model, pass_ = convert(proto)
    shape = CASES[name][1]
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, *shape[1:])).astype(np.float32)
        reference = run(proto, x)[0]
        (got,) = run(out, x)
        assert got.dtype == np.float32  # keep_io_types
        error = relative_error(got, reference)
        assert error < 1e-2, f"{name}: relative error {error:.2e}"
        assert error > 1e-6, "no FP16 rounding at all: was anything converted?"
        with torch.no_grad():
            assert relative_error(got, module(torch.from_numpy(x)).numpy()) < 1e-2
    # every GEMM/Conv weight is stored as FP16
    layers = discover_gemms(model)
    assert len(layers) == {"mlp": 3, "block": 4, "cnn": 3}[name]
    for layer in layers:
        assert layer.weight.stored_dtype == FLOAT16, layer.name
        assert layer.node.inputs[0].dtype == FLOAT16, layer.name
    assert [v.name for v in model.graph.inputs] == [i.name for i in proto.graph.input]
    assert [v.name for v in model.graph.outputs] == [o.name for o in proto.graph.output]
    assert all(v.dtype == FLOAT for v in (*model.graph.inputs, *model.graph.outputs))
    assert pass_.summary.initializers >= len(layers)


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_layernorm_and_softmax_stay_fp32(exported, dynamo):
    _, proto = exported("block", dynamo)
    _, model, pass_ = convert(proto)
    kept = [n for n in model.graph if n.op_type in ("LayerNormalization", "Softmax")]
    assert len(kept) == 3
    for node in kept:
        assert node.inputs[0].dtype == FLOAT and node.outputs[0].dtype == FLOAT
        assert all(v.dtype == FLOAT for v in node.inputs[1:] if v is not None)
    # and their consumers get FP16 back through one Cast
    for node in kept:
        consumers = [use.node for use in node.outputs[0].uses()]
        assert consumers and all(c.op_type == "Cast" for c in consumers)
        assert all(c.attributes["to"].as_int() == FLOAT16.value for c in consumers)
    assert pass_.summary.fp32_nodes["LayerNormalization"] == 2
    assert pass_.summary.fp32_nodes["Softmax"] == 1


def test_keep_list_is_configurable(exported):
    _, proto = exported("mlp", False)
    _, model, pass_ = convert(proto, keep_fp32_ops=("Relu",))
    (relu,) = [n for n in model.graph if n.op_type == "Relu"]
    assert relu.inputs[0].dtype == FLOAT and relu.outputs[0].dtype == FLOAT
    assert pass_.summary.fp32_nodes == {"Relu": 1}
    _, model, _ = convert(proto, keep_fp32_ops=())
    (relu,) = [n for n in model.graph if n.op_type == "Relu"]
    assert relu.inputs[0].dtype == FLOAT16


def test_fp16_io_when_not_keeping_io_types(exported):
    _, proto = exported("cnn", True)
    out, model, _ = convert(proto, keep_io_types=False)
    assert all(v.dtype == FLOAT16 for v in (*model.graph.inputs, *model.graph.outputs))
    x = np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)
    (got,) = run(out, x.astype(np.float16))
    assert got.dtype == np.float16
    assert relative_error(got, run(proto, x)[0]) < 1e-2


# ----------------------------------------------------------------------------- 2:4 survives


def test_24_pruned_weight_stays_exactly_sparse_and_legal(tmp_path):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 32)).astype(np.float32)  # MatMul weight [K, N]
    groups = np.moveaxis(w, 0, -1).reshape(-1, 4)  # groups of 4 down K
    drop = np.argsort(np.abs(groups), axis=1)[:, :2]
    np.put_along_axis(groups, drop, 0.0, axis=1)
    w = np.ascontiguousarray(np.moveaxis(groups.reshape(32, 64), -1, 0))
    w[0, 0], w[1, 0] = 0.0, -0.0  # explicit signed zeros in one group
    w[2:4, 0] = [1e-9, 3.0]  # a nonzero below FP16's smallest subnormal: becomes zero
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")
    node.metadata_props.add(key=SPARSITY_KEY, value="2:4")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        [numpy_helper.from_array(w, "W")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert check_model(_save(proto, tmp_path / "dense.onnx")).ok
    out, model, pass_ = convert(proto)
    report = check_model(save_model(model, tmp_path / "fp16.onnx"))
    (layer,) = report.layers
    assert layer.marked and layer.legal and layer.dtype == "FLOAT16"
    stored = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "W"))
    assert stored.dtype == np.float16
    expected_zero = (w == 0) | (np.abs(w) < 2.0**-25)
    np.testing.assert_array_equal(stored == 0, expected_zero)
    assert np.signbit(stored[1, 0]) and not np.signbit(stored[0, 0])
    np.testing.assert_array_equal(stored, w.astype(np.float16))
    assert pass_.summary.underflowed == 1
    x = rng.standard_normal((5, 64)).astype(np.float32)
    assert relative_error(run(out, x)[0], x @ w) < 1e-2


def test_lowered_24_conv_converted_to_fp16_stays_legal(tmp_path):
    """The deployment chain: 2:4 conv (TensorRT order) → im2col MatMul → FP16 → still legal."""
    from mpcompile.passes.im2col_lowering import LowerConvToIm2colPass

    rng = np.random.default_rng(5)
    w = np.moveaxis(rng.standard_normal((16, 3, 3, 16)).astype(np.float32), -1, 1)
    groups = np.moveaxis(w, 1, -1).reshape(-1, 4)  # 4 input channels at one (cout, kh, kw)
    np.put_along_axis(groups, np.argsort(np.abs(groups), axis=1)[:, :2], 0.0, axis=1)
    w = np.ascontiguousarray(np.moveaxis(groups.reshape(16, 3, 3, 16), -1, 1))
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])
    node.metadata_props.add(key=SPARSITY_KEY, value="2:4")
    proto = make([node], [vi("x", TensorProto.FLOAT, ["N", 16, 6, 6])],
                 [vi("y", TensorProto.FLOAT, ["N", 16, 6, 6])], [numpy_helper.from_array(w, "W")])
    model = ir.serde.deserialize_model(proto)
    assert LowerConvToIm2colPass()(model).modified
    assert ConvertToFloat16Pass()(model).modified
    path = save_model(model, tmp_path / "lowered16.onnx")
    (layer,) = check_model(path).layers
    assert layer.op == "MatMul" and layer.dtype == "FLOAT16" and layer.marked and layer.legal
    out = onnx.load(str(path))
    onnx.checker.check_model(out, full_check=True)
    x = rng.standard_normal((2, 16, 6, 6)).astype(np.float32)
    assert relative_error(run(out, x)[0], run(proto, x)[0]) < 1e-2


def _save(proto: onnx.ModelProto, path) -> str:
    onnx.save(proto, str(path))
    return str(path)


# ----------------------------------------------------------------------------- hand-built graphs


def make(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def test_constants_and_huge_values_are_converted_and_int_tensors_untouched():
    nodes = [
        helper.make_node("Constant", [], ["s"], value_float=2.0),
        helper.make_node("Constant", [], ["v"], value_floats=[1e5, -1e5, 0.5, 0.25]),
        helper.make_node("Constant", [], ["shape"],
                         value=numpy_helper.from_array(np.array([-1, 4], np.int64))),
        helper.make_node("Mul", ["x", "s"], ["a"]),
        helper.make_node("Reshape", ["a", "shape"], ["r"]),
        helper.make_node("Div", ["r", "v"], ["y"]),
    ]
    proto = make(nodes, [vi("x", TensorProto.FLOAT, ["N", 4])],
                 [vi("y", TensorProto.FLOAT, ["N", 4])])
    out, model, pass_ = convert(proto)
    consts = {n.outputs[0].name: n.attributes["value"].as_tensor()
              for n in model.graph if n.op_type == "Constant"}
    assert consts["s"].dtype == FLOAT16 and consts["v"].dtype == FLOAT16
    assert consts["shape"].dtype == ir.DataType.INT64
    clipped = np.array([FP16_MAX, -FP16_MAX, 0.5, 0.25], np.float16)
    np.testing.assert_array_equal(consts["v"].numpy(), clipped)
    assert pass_.summary.constants == 2 and pass_.summary.overflowed == 2
    x = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    np.testing.assert_allclose(run(out, x)[0], x * 2 / clipped.astype(np.float32), rtol=1e-3)


def test_decomposed_layernorm_stays_fp32_without_cast_ping_pong():
    """ReduceMean/Pow/Sqrt are kept; the Sub/Add/Div between them stay FP32 too (no Cast pairs)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array([1e-5], np.float32), "eps"),
             numpy_helper.from_array(np.array([2.0], np.float32), "two"),
             numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "W")]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("ReduceMean", ["h"], ["mean"], axes=[-1]),
        helper.make_node("Sub", ["h", "mean"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["std"]),
        helper.make_node("Div", ["d", "std"], ["y"]),
    ]
    proto = make(nodes, [vi("x", TensorProto.FLOAT, ["N", 16])],
                 [vi("y", TensorProto.FLOAT, ["N", 16])], inits)
    out, model, _ = convert(proto)
    by_output = {n.outputs[0].name: n for n in model.graph}
    assert by_output["h"].outputs[0].dtype == FLOAT16  # the GEMM runs in FP16
    assert by_output["ve"].outputs[0].dtype == FLOAT  # Add(eps) between ReduceMean and Sqrt
    assert by_output["ve"].inputs[0] is by_output["var"].outputs[0]  # no Cast in between
    # eps is read only by the FP32 Add, so it keeps its float32 value (1e-5 is not exact in FP16)
    assert model.graph.initializers["eps"].dtype == FLOAT
    assert model.graph.initializers["W"].dtype == FLOAT16
    x = rng.standard_normal((4, 16)).astype(np.float32)
    assert relative_error(run(out, x)[0], run(proto, x)[0]) < 1e-2


def test_ops_without_fp16_rule_run_fp32_behind_casts():
    w = np.random.default_rng(1).standard_normal((8, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("TopK", ["h", "k"], ["vals", "idx"], axis=-1),
        helper.make_node("Neg", ["vals"], ["y"]),
    ]
    proto = make(nodes, [vi("x", TensorProto.FLOAT, ["N", 8])],
                 [vi("y", TensorProto.FLOAT, ["N", 3]), vi("idx", TensorProto.INT64, ["N", 3])],
                 [numpy_helper.from_array(np.array([3], np.int64), "k"),
                  numpy_helper.from_array(w, "W")])
    out, model, pass_ = convert(proto)
    input_cast, matmul, cast, topk, neg = list(model.graph)
    assert input_cast.op_type == "Cast" and matmul.inputs[0] is input_cast.outputs[0]
    assert matmul.op_type == "MatMul" and matmul.outputs[0].dtype == FLOAT16
    assert cast.op_type == "Cast" and topk.inputs[0] is cast.outputs[0]
    assert topk.inputs[0].dtype == FLOAT
    assert topk.outputs[1].dtype == ir.DataType.INT64
    # Neg sits between FP32 TopK and the FP32 graph output: it stays FP32, no Cast pair around it
    assert neg.inputs[0] is topk.outputs[0] and neg.outputs[0].dtype == FLOAT
    assert pass_.summary.fp32_nodes == {"TopK": 1, "Neg": 1}
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    y, idx = run(out, x)
    y_ref, idx_ref = run(proto, x)
    np.testing.assert_array_equal(idx, idx_ref)
    np.testing.assert_allclose(y, y_ref, rtol=1e-2, atol=1e-2)


def test_graph_output_read_by_another_node_keeps_its_name():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["b"])]
    proto = make(nodes, [vi("x", TensorProto.FLOAT, ["N", 4])],
                 [vi("a", TensorProto.FLOAT, ["N", 4]), vi("b", TensorProto.FLOAT, ["N", 4])])
    out, model, _ = convert(proto)
    assert [o.name for o in out.graph.output] == ["a", "b"]
    assert all(v.dtype == FLOAT for v in model.graph.outputs)
    x = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
    a, b = run(out, x)
    np.testing.assert_array_equal(a, np.maximum(x, 0))
    np.testing.assert_array_equal(b, -np.maximum(x, 0))


def _subgraph_bodies(node: ir.Node) -> list[ir.Graph]:
    return [a.as_graph() for a in node.attributes.values() if a.type == ir.AttributeType.GRAPH]


@pytest.mark.parametrize("build", ["if_gemm_model", "if_conv_model", "loop_model", "scan_model"])
def test_control_flow_bodies_stay_fp32_and_the_model_runs(build):
    """Bodies read outer values by name: the pass must cast what they read back to FP32."""
    import _subgraph_models

    proto = getattr(_subgraph_models, build)()
    model = ir.serde.deserialize_model(proto)
    pass_ = ConvertToFloat16Pass()
    pass_(model)  # the Loop and Scan models compute everything in the body: nothing to convert
    out = ir.serde.serialize_model(model)
    assert pass_.summary.control_flow_nodes == 1
    top = set(model.graph.initializers)
    body_only = {v.name for v in model.graph.initializers.values()
                 if v.uses() and all(u.node.graph is not model.graph for u in v.uses())}
    for name in top:
        value = model.graph.initializers[name]
        if value.dtype in (FLOAT, FLOAT16):
            assert value.dtype == (FLOAT if name in body_only else FLOAT16), name
    if build == "if_gemm_model":  # h0 comes from the FP16 MatMul P: the branches read an FP32 Cast of it
        (if_node,) = [n for n in model.graph if n.op_type == "If"]
        reads = {v for g in _subgraph_bodies(if_node) for n in g for v in n.inputs if v is not None}
        casts = [v for v in reads if v.producer() is not None and v.producer().op_type == "Cast"]
        assert casts and all(v.dtype == FLOAT for v in casts)
    onnx.checker.check_model(out, full_check=True)
    feeds = {}
    for value in proto.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else 2 for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = np.random.default_rng(0).standard_normal(dims).astype(np.float32)
    for sign in (1.0, -1.0):  # both If branches
        arrays = [sign * a for a in feeds.values()]
        assert relative_error(run(out, *arrays)[0], run(proto, *arrays)[0]) < 2e-2


def test_model_without_float_tensors_is_not_modified():
    proto = make([helper.make_node("Add", ["a", "b"], ["y"])],
                 [vi("a", TensorProto.INT64, ["N"]), vi("b", TensorProto.INT64, ["N"])],
                 [vi("y", TensorProto.INT64, ["N"])])
    model = ir.serde.deserialize_model(proto)
    assert not ConvertToFloat16Pass()(model).modified
    assert [n.op_type for n in model.graph] == ["Add"]


def test_compile_fp16_of_a_control_flow_model_says_bodies_stay_fp32(tmp_path):
    """Was: exit 4 'FP16 conversion does not handle control flow'."""
    import _subgraph_models

    from mpcompile.pipeline import CompileOptions, compile_model

    onnx.save(_subgraph_models.if_gemm_model(), tmp_path / "if.onnx")
    result = compile_model(tmp_path / "if.onnx", CompileOptions(output=str(tmp_path / "o.onnx"), fp16=True))
    assert result.check_ok and result.validation.relative_l2 < 1.0
    note = next(n for n in result.notes if n.startswith("--fp16 leaves If/Loop/Scan bodies in FP32"))
    assert "then_mm" in note or "else_mm" in note
    saved = onnx.load(tmp_path / "o.onnx")
    dtypes = {t.name: t.data_type for t in saved.graph.initializer}
    assert dtypes["w0"] == TensorProto.FLOAT16 and dtypes["w_shared"] == TensorProto.FLOAT
