"""GEMM discovery on models exported from torch (both exporters) and hand-built graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mpcompile.io.model_io import load_model
from mpcompile.passes.gemm_discovery import discover_gemms
from mpcompile.io.shapes import ShapeSpec, infer_static_shapes

torch = pytest.importorskip("torch")


class Block(torch.nn.Module):
    """A transformer-ish block plus convs: Linear, attention MatMuls, strided and depthwise conv."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ln = torch.nn.LayerNorm(32)
        self.q = torch.nn.Linear(32, 32)
        self.k = torch.nn.Linear(32, 32)
        self.fc = torch.nn.Linear(32, 64)
        self.head = torch.nn.Linear(64, 10, bias=False)
        self.dw = torch.nn.Conv2d(16, 16, 3, groups=16, padding=1)
        self.conv = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.dil = torch.nn.Conv2d(32, 32, 3, padding=2, dilation=2)

    def forward(self, x, img):
        h = self.ln(x)
        attn = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2), dim=-1)
        y = self.head(torch.relu(self.fc(attn @ h)))
        return y, self.dil(self.conv(self.dw(self.stem(img))))


def torch_matrix(module) -> np.ndarray:
    w = module.weight.detach().numpy()
    if w.ndim == 4:
        return w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
    return w


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_discovery_on_torch_export_finds_exact_layers(export, dynamo):
    model = Block()
    path = export(model, (torch.randn(2, 8, 32), torch.randn(2, 3, 8, 8)), dynamo=dynamo, input_names=("x", "img"))
    loaded = load_model(path)
    spec = ShapeSpec(dims={}, default=2)
    layers = discover_gemms(loaded.model, infer_static_shapes(loaded.proto, spec))
    # attention MatMuls (activation × activation) are not GEMMs with weights
    assert len(layers) == 8
    expected = {name: torch_matrix(getattr(model, name)) for name in ("q", "k", "fc", "head", "dw", "conv", "stem", "dil")}
    matched = {}
    for layer in layers:
        matrix = layer.matrix()
        hits = [n for n, m in expected.items() if m.shape == matrix.shape and np.array_equal(m, matrix)]
        assert len(hits) == 1, f"{layer.name} matches {hits}"
        matched[hits[0]] = layer
    assert set(matched) == set(expected)
    eligible = {name for name, layer in matched.items() if layer.eligible}
    assert eligible == {"q", "k", "fc", "conv", "dil"}
    assert "N=10 < 16" in matched["head"].reason
    assert "depthwise" in matched["dw"].reason
    assert "Cin=3" in matched["stem"].reason
    # MACs: conv 16→32, 3×3, stride 2 on 8×8 at batch 2 → output 2×32×4×4, 16·9 MACs each
    assert matched["conv"].macs == 2 * 32 * 4 * 4 * 16 * 9
    assert matched["fc"].macs == 2 * 8 * 64 * 32
    assert matched["conv"].reduction == 144 and matched["conv"].in_channels == 16


def test_legacy_gemm_transb(export):
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    path = export(mlp, (torch.randn(4, 64),), dynamo=False)
    layers = discover_gemms(load_model(path).model)
    assert [layer.op_type for layer in layers] == ["Gemm", "Gemm"]
    assert layers[0].layout == "gemm_transB1"
    np.testing.assert_array_equal(layers[0].matrix(), mlp[0].weight.detach().numpy())
    assert layers[1].matrix().shape == (10, 32)


def _save(tmp_path, graph, name="g.onnx", opset=17):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path = tmp_path / name
    onnx.save(model, path)
    return path


def test_weight_through_transpose_cast_and_constant_node(tmp_path):
    rng = np.random.default_rng(0)
    w_nk = rng.normal(size=(24, 32)).astype(np.float16)  # stored [N, K] fp16, transposed to [K, N]
    nodes = [
        helper.make_node("Constant", [], ["w_const"], value=numpy_helper.from_array(w_nk, "w")),
        helper.make_node("Cast", ["w_const"], ["w_f32"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["w_f32"], ["w_kn"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w_kn"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 24])],
    )
    layers = discover_gemms(load_model(_save(tmp_path, graph)).model)
    assert len(layers) == 1
    layer = layers[0]
    assert [n.op_type for n in layer.weight.chain] == ["Cast", "Transpose"]
    np.testing.assert_array_equal(layer.matrix(), w_nk.astype(np.float32))
    assert layer.eligible


def test_shared_weight_with_gather_is_not_eligible_and_shared_gemms_are_analysed_once(tmp_path):
    rng = np.random.default_rng(1)
    emb = numpy_helper.from_array(rng.normal(size=(32, 64)).astype(np.float32), "emb")  # [K=32, N=64]
    tied = numpy_helper.from_array(rng.normal(size=(64, 16)).astype(np.float32), "tied")
    nodes = [
        helper.make_node("MatMul", ["x", "emb"], ["h"], name="proj"),
        helper.make_node("Gather", ["emb", "ids"], ["g"], name="lookup"),
        helper.make_node("MatMul", ["h", "tied"], ["y1"], name="a"),
        helper.make_node("MatMul", ["h", "tied"], ["y2"], name="b"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, None]) for n in ("g", "y1", "y2")],
        initializer=[emb, tied],
    )
    layers = {layer.name: layer for layer in discover_gemms(load_model(_save(tmp_path, graph)).model)}
    assert not layers["proj"].eligible and "Gather" in layers["proj"].reason
    assert layers["a"].eligible and layers["b"].eligible
    assert layers["a"].shared_with == ["b"] and layers["a"].weight.root is layers["b"].weight.root


def test_dequantize_chain_is_found_but_not_eligible(tmp_path):
    q = numpy_helper.from_array(np.arange(32 * 16, dtype=np.int8).reshape(32, 16), "wq")
    scale = numpy_helper.from_array(np.array(0.5, dtype=np.float32), "scale")
    zero = numpy_helper.from_array(np.array(1, dtype=np.int8), "zp")
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "scale", "zp"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
        initializer=[q, scale, zero],
    )
    (layer,) = discover_gemms(load_model(_save(tmp_path, graph)).model)
    assert not layer.eligible and "quantized" in layer.reason
    expected = (np.arange(32 * 16).reshape(32, 16).astype(np.int8).astype(np.float32) - 1) * 0.5
    np.testing.assert_array_equal(layer.matrix(), expected.T)


def test_k_not_multiple_of_4(tmp_path):
    w = numpy_helper.from_array(np.ones((30, 8), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 30])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], initializer=[w],
    )
    (layer,) = discover_gemms(load_model(_save(tmp_path, graph)).model)
    assert not layer.eligible and "not a multiple of 4" in layer.reason
