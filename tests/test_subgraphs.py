"""Layers inside If / Loop / Scan bodies: found, masked, checked, validated (issue 11 part 1).

Each model is compiled once (module fixture) through the CLI entry point; the tests then read
the written file with plain ``onnx`` and ONNX Runtime, independently of the compiler's IR.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).parent))
import _subgraph_models as models  # noqa: E402

from mpcompile.checks.checker import check_model, check_proto  # noqa: E402
from mpcompile.cli import main  # noqa: E402
from mpcompile.passes.gemm_discovery import discover_gemms  # noqa: E402
from mpcompile.passes.permute_channels import SUBGRAPH_REASON  # noqa: E402

BUILDERS = {
    "if_gemm": models.if_gemm_model,
    "if_conv": models.if_conv_model,
    "loop": models.loop_model,
    "scan": models.scan_model,
}
# Expected display names of the layers inside bodies (path: parent node / attribute / node).
SUBGRAPH_LAYERS = {
    "if_gemm": {"If_5/then_branch/then_mm", "If_5/then_branch/then_gemm",
                "If_5/else_branch/else_mm", "If_5/else_branch/else_mm2"},
    "if_conv": {"If_5/then_branch/then_conv", "If_5/else_branch/else_conv"},
    "loop": {"Loop_0/body/body_mm_x", "Loop_0/body/body_mm_h"},
    "scan": {"Scan_1/body/cell_x", "Scan_1/body/cell_s"},
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, tuple[Path, Path, dict]]:
    """name -> (dense path, sparse path, report) for every model, compiled with --method cast
    (calibrated where the layer input can be captured; kept weights are not changed by cast,
    so the sparse weights are exactly the dense ones times a 0/1 mask)."""
    root = tmp_path_factory.mktemp("subgraphs")
    out = {}
    for name, build in BUILDERS.items():
        dense = root / f"{name}.onnx"
        onnx.save(build(), str(dense))
        sparse = root / f"{name}.sparse.onnx"
        code = main(["-q", str(dense), "-o", str(sparse), "--method", "cast", "--perm-steps", "20"])
        assert code == 0, name
        report = json.loads(sparse.with_name(f"{name}.sparse.report.json").read_text())
        out[name] = (dense, sparse, report)
    return out


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every initializer and Constant value in the model, subgraphs included, by name."""
    found: dict[str, np.ndarray] = {}

    def walk(graph: onnx.GraphProto) -> None:
        for t in graph.initializer:
            found[t.name] = numpy_helper.to_array(t)
        for node in graph.node:
            if node.op_type == "Constant":
                found[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            for attr in node.attribute:
                for body in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs):
                    walk(body)

    walk(model.graph)
    return found


def _set_weights(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> None:
    def walk(graph: onnx.GraphProto) -> None:
        for t in graph.initializer:
            if t.name in values:
                t.CopyFrom(numpy_helper.from_array(values[t.name], t.name))
        for node in graph.node:
            if node.op_type == "Constant" and node.output[0] in values:
                attr = node.attribute[0]
                attr.t.CopyFrom(numpy_helper.from_array(values[node.output[0]], attr.t.name))
            for attr in node.attribute:
                for body in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs):
                    walk(body)

    walk(model.graph)


def _inputs(name: str) -> dict[str, np.ndarray]:
    """Two batches of 4: positive- and negative-mean inputs, so both If branches run."""
    rng = np.random.default_rng(7)
    shape = {"if_conv": (2, 4, 8, 8), "scan": (4, 4, models.D)}.get(name, (4, models.D))
    x = np.abs(rng.standard_normal(shape)).astype(np.float32)
    return {"pos": {"x": x}, "neg": {"x": -x}}


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_discovery_finds_every_constant_weight_gemm_in_bodies(name):
    proto = BUILDERS[name]()
    layers = discover_gemms(ir.from_proto(proto))
    assert len(layers) == models.protobuf_gemm_count(proto)
    assert SUBGRAPH_LAYERS[name] <= {layer.name for layer in layers}


def test_if_branches_reading_one_outer_weight_share_one_layer_key():
    layers = {layer.name: layer for layer in discover_gemms(ir.from_proto(models.if_gemm_model()))}
    then_mm, else_mm = layers["If_5/then_branch/then_mm"], layers["If_5/else_branch/else_mm"]
    assert then_mm.weight.root is else_mm.weight.root and then_mm.weight_key == "w_shared"
    assert then_mm.shared_with == ["If_5/else_branch/else_mm"] and then_mm.eligible
    assert layers["If_5/else_branch/else_mm2"].weight_key == "w_else"  # a Constant inside the branch
    conv = discover_gemms(ir.from_proto(models.if_conv_model()))
    copies = {layer.weight_key for layer in conv if layer.name.startswith("If_5/")}
    assert copies == {"wc_then", "wc_else"}  # copies of the same values stay two weights


@pytest.mark.parametrize("name", list(BUILDERS))
def test_compile_masks_body_layers_and_check_passes(compiled, name):
    dense_path, sparse_path, report = compiled[name]
    by_name = {layer["name"]: layer for layer in report["layers"]}
    for layer in SUBGRAPH_LAYERS[name]:
        assert by_name[layer]["sparse"] is True, layer
    check = check_model(sparse_path)
    assert check.ok
    legal = {layer.node for layer in check.layers if layer.marked and layer.legal}
    assert SUBGRAPH_LAYERS[name] <= legal
    assert report["check"]["ok"] is True
    assert main(["-q", "check", str(sparse_path)]) == 0


@pytest.mark.parametrize("name", list(BUILDERS))
def test_sparse_model_equals_dense_model_with_masks_applied_by_hand(compiled, name):
    dense_path, sparse_path, _ = compiled[name]
    dense, sparse = onnx.load(str(dense_path)), onnx.load(str(sparse_path))
    dense_w, sparse_w = _weights(dense), _weights(sparse)
    masked = {}
    for key, w in dense_w.items():
        if w.ndim >= 2 and w.dtype == np.float32 and key in sparse_w:
            mask = sparse_w[key] != 0
            if not mask.all():
                masked[key] = np.where(mask, w, 0).astype(np.float32)
    # every body weight was masked (the shared w_shared once)
    names = {"if_gemm": {"w0", "wq", "w_shared", "w_then", "w_else"}, "if_conv": {"wc_then", "wc_else"},
             "loop": {"w_x", "w_h"}, "scan": {"w_sx", "w_ss"}}[name]
    assert set(masked) == names
    _set_weights(dense, masked)
    for feeds in _inputs(name).values():
        expected, got = _run(dense, feeds), _run(sparse, feeds)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        assert not np.allclose(got, _run(onnx.load(str(dense_path)), feeds), atol=1e-3)  # masks bite


def test_branches_both_run_in_the_validation_inputs():
    proto = models.if_gemm_model()
    feeds = _inputs("if_gemm")
    # flipping the sign of x flips mean(x) > 0: the two feeds take different branches
    assert float(feeds["pos"]["x"].mean()) > 0 > float(feeds["neg"]["x"].mean())
    assert not np.allclose(_run(proto, feeds["pos"]), -_run(proto, feeds["neg"]))


def test_checker_rejects_a_body_weight_that_violates_24(compiled, tmp_path):
    dense_path, sparse_path, _ = compiled["if_gemm"]
    sparse = onnx.load(str(sparse_path))
    dense_w = _weights(onnx.load(str(dense_path)))
    _set_weights(sparse, {"w_else": dense_w["w_else"], "w_then": dense_w["w_then"]})
    report = check_proto(sparse, base_dir=tmp_path)
    assert not report.ok
    failed = {layer.node: layer for layer in report.failures}
    assert set(failed) == {"If_5/else_branch/else_mm2", "If_5/then_branch/then_gemm"}
    assert failed["If_5/then_branch/then_gemm"].violating_groups == 256  # dense: every group
    bad = tmp_path / "bad.onnx"
    onnx.save(sparse, str(bad))
    assert main(["-q", "check", str(bad)]) == 1


def test_weight_chain_crossing_into_a_body_is_followed(tmp_path):
    """An outer Transpose feeding a body MatMul: discovery and the checker both see through it."""
    proto = models.loop_model()
    w_x = next(t for t in proto.graph.initializer if t.name == "w_x")
    stored = numpy_helper.to_array(w_x).T.copy()  # stored [N, K]; the body reads Transpose → [K, N]
    w_x.CopyFrom(numpy_helper.from_array(stored, "w_x_t"))
    proto.graph.node.insert(0, onnx.helper.make_node("Transpose", ["w_x_t"], ["w_x"], perm=[1, 0]))
    onnx.checker.check_model(proto, full_check=True)
    # the Loop is now node 1 of the top graph, so its body layers are named Loop_1/body/...
    layers = {layer.name: layer for layer in discover_gemms(ir.from_proto(proto))}
    layer = layers["Loop_1/body/body_mm_x"]
    assert layer.weight_key == "w_x_t" and [n.op_type for n in layer.weight.chain] == ["Transpose"]
    # prune the stored tensor along its axis 1 (= K of the consumer's view): legal
    pruned = stored.copy()
    pruned.reshape(models.D, -1, 4)[:, :, :2] = 0
    w_x.CopyFrom(numpy_helper.from_array(pruned, "w_x_t"))
    body = proto.graph.node[1].attribute[0].g
    body.node[0].metadata_props.add(key="mpcompile.sparsity", value="2:4")
    check = {layer.node: layer for layer in check_proto(proto, base_dir=tmp_path).layers}
    verdict = check["Loop_1/body/body_mm_x"]
    assert verdict.legal and "stored w_x_t[32,32] axis 1" in verdict.reduction
    # the same zeros along axis 0 of the stored tensor are N for the consumer: caught
    w_x.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(pruned.T), "w_x_t"))
    assert not check_proto(proto, base_dir=tmp_path).ok


def test_torch_cond_export_compiles_and_checks(tmp_path):
    """A real export: torch.cond through the dynamo exporter gives an If with Gemms in both
    branches whose weights are outer initializers."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")

    class Gate(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = (torch.nn.Linear(32, 32) for _ in range(3))

        def forward(self, x):
            h = self.a(x)
            return torch.cond(h.mean() > 0, lambda t: self.b(t).relu(), lambda t: self.c(t), (h,))

    torch.manual_seed(0)
    path = tmp_path / "gate.onnx"
    try:
        torch.onnx.export(Gate().eval(), (torch.randn(4, 32),), str(path), dynamo=True)
    except Exception as exc:  # an exporter without torch.cond support: nothing to test here
        pytest.skip(f"torch.cond export failed: {type(exc).__name__}")
    proto = onnx.load(str(path))
    layers = discover_gemms(ir.from_proto(proto))
    assert len(layers) == models.protobuf_gemm_count(proto) == 3
    in_bodies = {layer.name for layer in layers if "/then_branch/" in layer.name or "/else_branch/" in layer.name}
    assert len(in_bodies) == 2
    sparse = tmp_path / "gate.sparse.onnx"
    assert main(["-q", str(path), "-o", str(sparse), "--method", "cast", "--perm-steps", "20"]) == 0
    check = check_model(sparse)
    assert check.ok and in_bodies <= {layer.node for layer in check.layers if layer.marked and layer.legal}
    dense_w, sparse_w = _weights(proto), _weights(onnx.load(str(sparse)))
    masked = {k: np.where(sparse_w[k] != 0, w, 0).astype(w.dtype) for k, w in dense_w.items()
              if w.ndim == 2 and k in sparse_w and not (sparse_w[k] != 0).all()}
    assert len(masked) == 3
    manual = onnx.load(str(path))
    _set_weights(manual, masked)
    x = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    for feeds in ({"x": x}, {"x": -x}):
        name = proto.graph.input[0].name
        feeds = {name: feeds["x"]}
        np.testing.assert_allclose(_run(onnx.load(str(sparse)), feeds), _run(manual, feeds), rtol=1e-5, atol=1e-6)


def test_report_says_which_body_layers_were_calibrated(compiled):
    layers = {lay["name"]: lay for lay in compiled["loop"][2]["layers"]}
    assert layers["Loop_0/body/body_mm_x"]["calibrated"] is True   # reads the outer graph input x
    assert layers["Loop_0/body/body_mm_h"]["calibrated"] is False  # reads the loop-carried state
    notes = " ".join(compiled["loop"][2]["notes"])
    assert "Loop_0/body/body_mm_h" in notes and "magnitude" in notes and "body_mm_x" not in notes
    gemm = {lay["name"]: lay for lay in compiled["if_gemm"][2]["layers"]}
    # one mask for the weight both branches read, reported for both readers
    assert gemm["If_5/then_branch/then_mm"]["calibrated"] is gemm["If_5/else_branch/else_mm"]["calibrated"] is True
    assert gemm["If_5/then_branch/then_gemm"]["calibrated"] is False  # reads t1, computed in the branch
    scan = {lay["name"]: lay for lay in compiled["scan"][2]["layers"]}
    assert scan["Scan_1/body/cell_x"]["calibrated"] is False and scan["Scan_1/body/cell_s"]["calibrated"] is False
    if_conv = {lay["name"]: lay for lay in compiled["if_conv"][2]["layers"]}
    assert if_conv["If_5/then_branch/then_conv"]["calibrated"] is True  # reads the outer Relu output


def test_body_layers_get_macs(compiled):
    layers = {lay["name"]: lay for lay in compiled["if_conv"][2]["layers"]}
    assert layers["If_5/then_branch/then_conv"]["macs"] == 2 * 16 * 8 * 8 * 16 * 9
    gemm = {lay["name"]: lay for lay in compiled["if_gemm"][2]["layers"]}
    assert gemm["If_5/else_branch/else_mm2"]["macs"] == 1 * models.D * models.D  # batch=1 by default


def test_permutations_never_cross_into_bodies(compiled):
    records = compiled["if_gemm"][2]["permutations"]
    by_first = {rec["layers"][0]: rec for rec in records}
    assert not any(rec["folded"] or rec["gather_inserted"] for rec in records)
    q = next(rec for rec in records if "Q" in rec["layers"])
    assert "read inside a subgraph" in q["reason"]
    assert by_first["If_5/then_branch/then_gemm"]["reason"] == SUBGRAPH_REASON


def _fold_model(branch_reads: str) -> onnx.ModelProto:
    """x → P → Relu → Q at the top level, plus an If whose branches read ``branch_reads``."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array((rng.standard_normal((models.D, models.D)) / 6).astype(np.float32), n)
             for n in ("wp", "wq", "wb")]
    branches = [onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", [branch_reads, "wb"], [f"{tag}_out"], name=f"{tag}_mm")],
        f"{tag}_body", [], [onnx.helper.make_tensor_value_info(f"{tag}_out", onnx.TensorProto.FLOAT, None)])
        for tag in ("then", "else")]
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "wp"], ["p"], name="P"),
        onnx.helper.make_node("Relu", ["p"], ["r"]),
        onnx.helper.make_node("MatMul", ["r", "wq"], ["q"], name="Q"),
        onnx.helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0),
        onnx.helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0.0, np.float32))),
        onnx.helper.make_node("Greater", ["m", "zero"], ["cond"]),
        onnx.helper.make_node("If", ["cond"], ["b"], then_branch=branches[0], else_branch=branches[1]),
        onnx.helper.make_node("Add", ["q", "b"], ["y"]),
    ]
    graph = onnx.helper.make_graph(
        nodes, "fold", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", models.D])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", models.D])], inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", models.OPSET)])
    model.ir_version = 8
    return model


def test_top_level_fold_beside_control_flow_is_exact():
    from mpcompile.passes.permute_channels import apply_fold, plan_fold

    proto = _fold_model("x")  # the branches read x, not the permuted tensor
    model = ir.from_proto(proto)
    layers = discover_gemms(model)
    q = next(layer for layer in layers if layer.name == "Q")
    plan = plan_fold(model, q, layers)
    assert plan.foldable, plan.reason
    apply_fold(model, plan, np.random.default_rng(0).permutation(models.D))
    folded = ir.to_proto(model)
    for feeds in _inputs("if_gemm").values():
        np.testing.assert_allclose(_run(folded, feeds), _run(proto, feeds), rtol=1e-5, atol=1e-5)
    assert not np.array_equal(_weights(folded)["wq"], _weights(proto)["wq"])  # it did permute


def test_fold_refused_when_a_body_reads_the_permuted_tensor():
    from mpcompile.passes.permute_channels import plan_fold

    model = ir.from_proto(_fold_model("r"))  # the branches read the Relu output too
    layers = discover_gemms(model)
    plan = plan_fold(model, next(layer for layer in layers if layer.name == "Q"), layers)
    assert not plan.foldable and "read inside a subgraph" in plan.reason
    body = next(layer for layer in layers if layer.name == "If_6/then_branch/then_mm")
    assert plan_fold(model, body, layers).reason == SUBGRAPH_REASON


def test_im2col_lowers_convs_inside_if_branches(compiled, tmp_path):
    """Was: --conv im2col left body convs as Conv. Lowered, the If model computes what the
    Conv-form sparse model computes (same masks), and the checker reads the lowered GEMMs."""
    dense, sparse, _ = compiled["if_conv"]
    lowered = tmp_path / "if_conv.im2col.onnx"
    code = main(["-q", str(dense), "-o", str(lowered), "--method", "cast", "--perm-steps", "20",
                 "--conv", "im2col"])
    assert code == 0
    proto = onnx.load(str(lowered))
    (if_node,) = [n for n in proto.graph.node if n.op_type == "If"]
    for branch in if_node.attribute:
        ops = [n.op_type for n in branch.g.node]
        assert "Conv" not in ops and "MatMul" in ops, ops
    assert check_proto(proto).ok
    onnx.checker.check_model(proto, full_check=True)
    for feeds in _inputs("if_conv").values():
        np.testing.assert_allclose(_run(proto, feeds), _run(onnx.load(str(sparse)), feeds), rtol=1e-4, atol=1e-5)
