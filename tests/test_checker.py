"""Tests for the independent 2:4 checker (mpcompile.checks.checker).

Models are built here with onnx.helper; pruning and the reference group counter are written
again in this file (loops, not the checker's vectorised code) so a shared bug cannot hide.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mpcompile.checks.checker import (
    SPARSITY_KEY,
    CheckReport,
    check_model,
    count_24_violations,
    render_check_table,
)
from mpcompile.errors import ExternalDataError, InvalidModelError

RNG_SEED = 1234


# ----------------------------------------------------------------------------- helpers


def prune_24(w: np.ndarray, axis: int) -> np.ndarray:
    """Zero the 2 smallest |w| of every group of 4 consecutive entries along ``axis``."""
    moved = np.moveaxis(np.array(w, copy=True), axis, -1)
    shape = moved.shape
    groups = moved.reshape(-1, 4)
    drop = np.argsort(np.abs(groups), axis=1)[:, :2]
    np.put_along_axis(groups, drop, 0.0, axis=1)
    return np.moveaxis(groups.reshape(shape), -1, axis)


def reference_bad_groups(w: np.ndarray, axis: int) -> int:
    """Plain-loop count of groups of 4 along ``axis`` with more than 2 nonzeros."""
    moved = np.moveaxis(w, axis, -1)
    bad = 0
    for index in np.ndindex(moved.shape[:-1]):
        row = moved[index]
        for start in range(0, row.shape[0], 4):
            if sum(1 for v in row[start:start + 4] if v != 0) > 2:
                bad += 1
    return bad


def randn(*shape: int, seed: int = RNG_SEED) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    assert np.count_nonzero(w) == w.size
    return w


def out(name: str, elem_type: int, rank: int = 2) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, [f"{name}_{i}" for i in range(rank)])


def mark(node: onnx.NodeProto) -> onnx.NodeProto:
    entry = node.metadata_props.add()
    entry.key, entry.value = SPARSITY_KEY, "2:4"
    return node


def make_model(nodes, initializers, inputs, outputs, opset: int = 21) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def matmul_model(w: np.ndarray, marked: bool = True, name: str = "w") -> onnx.ModelProto:
    k, n = w.shape[-2:]
    node = helper.make_node("MatMul", ["x", name], ["y"], name="fc")
    return make_model(
        [mark(node) if marked else node],
        [numpy_helper.from_array(w, name)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
        [out("y", TensorProto.FLOAT, w.ndim)],
    )


def gemm_model(b: np.ndarray, trans_b: int, marked: bool = True) -> onnx.ModelProto:
    k = b.shape[1] if trans_b else b.shape[0]
    node = helper.make_node("Gemm", ["x", "b"], ["y"], name="gemm", transB=trans_b, transA=0)
    return make_model(
        [mark(node) if marked else node],
        [numpy_helper.from_array(b, "b")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
        [out("y", TensorProto.FLOAT)],
    )


def conv_model(w: np.ndarray, group: int = 1, marked: bool = True) -> onnx.ModelProto:
    cin = w.shape[1] * group
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", group=group, pads=[1, 1, 1, 1])
    return make_model(
        [mark(node) if marked else node],
        [numpy_helper.from_array(w, "w")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, 8, 8])],
        [out("y", TensorProto.FLOAT, 4)],
    )


def check(model: onnx.ModelProto, tmp_path: Path, name: str = "m.onnx") -> CheckReport:
    path = tmp_path / name
    onnx.save(model, path)
    return check_model(path)


def only_layer(report: CheckReport):
    assert len(report.layers) == 1
    return report.layers[0]


# ----------------------------------------------------------------------------- MatMul / Gemm


def test_matmul_pruned_down_k_is_legal(tmp_path):
    w = prune_24(randn(32, 12), axis=0)
    layer = only_layer(report := check(matmul_model(w), tmp_path))
    assert layer.marked and layer.eligible and layer.legal
    assert layer.shape == (12, 32)
    assert layer.reduction.startswith("axis 0 of W[K,N]")
    assert layer.groups == 12 * 32 // 4
    assert layer.violating_groups == 0
    assert layer.density == pytest.approx(0.5)
    assert layer.verdict == "2:4 ✓"
    assert report.ok


def test_matmul_pruned_along_n_is_caught_with_exact_count(tmp_path):
    w = prune_24(randn(32, 12), axis=1)  # the wrong axis: 50 % zeros, not TensorRT-legal
    layer = only_layer(report := check(matmul_model(w), tmp_path))
    expected = reference_bad_groups(w, axis=0)
    assert expected > 0
    assert layer.violating_groups == expected
    assert layer.density == pytest.approx(0.5)
    assert not layer.legal and layer.failed
    assert layer.verdict == "VIOLATES 2:4"
    assert not report.ok


def test_matmul_wrong_axis_fixed_pattern_count(tmp_path):
    # Keep columns 0,1 of every group of 4 columns: columns j%4 in {0,1} stay fully dense, so
    # each of those 6 columns has K/4 = 8 bad groups: 48 of 96.
    w = randn(32, 12)
    w[:, (np.arange(12) % 4) >= 2] = 0.0
    layer = only_layer(check(matmul_model(w), tmp_path))
    assert (layer.groups, layer.violating_groups) == (96, 48)


def test_single_extra_nonzero_is_one_violation(tmp_path):
    w = prune_24(randn(16, 8), axis=0)
    zeros = np.argwhere(w[4:8, 5] == 0)[0, 0]
    w[4 + zeros, 5] = 0.25
    layer = only_layer(check(matmul_model(w), tmp_path))
    assert layer.violating_groups == 1


def test_negative_zero_counts_as_zero(tmp_path):
    w = prune_24(randn(16, 8), axis=0)
    w[w == 0] = -0.0
    assert np.signbit(w[w == 0]).all()
    assert only_layer(check(matmul_model(w), tmp_path)).legal


def test_unmarked_dense_layer_does_not_fail(tmp_path):
    layer = only_layer(report := check(matmul_model(randn(16, 8), marked=False), tmp_path))
    assert not layer.marked and layer.eligible and not layer.legal
    assert layer.verdict == "dense"
    assert layer.violating_groups == 16 * 8 // 4
    assert report.ok


def test_unmarked_sparse_layer_is_reported_legal(tmp_path):
    layer = only_layer(check(matmul_model(prune_24(randn(16, 8), 0), marked=False), tmp_path))
    assert layer.legal and not layer.marked and layer.verdict == "2:4 ✓"


def test_batched_matmul_groups_down_axis_minus_2(tmp_path):
    w = prune_24(randn(3, 16, 8), axis=1)
    layer = only_layer(check(matmul_model(w), tmp_path))
    assert layer.legal and layer.groups == 3 * 8 * 4
    assert layer.shape == (24, 16)
    bad = prune_24(randn(3, 16, 8), axis=2)
    layer = only_layer(check(matmul_model(bad), tmp_path, "bad.onnx"))
    assert layer.violating_groups == reference_bad_groups(bad, axis=1) > 0


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_reduction_axis_follows_transb(tmp_path, trans_b):
    k_axis = 1 if trans_b else 0
    b = prune_24(randn(16, 16), axis=k_axis)  # square: the wrong axis still has the right shape
    good = only_layer(check(gemm_model(b, trans_b), tmp_path, "good.onnx"))
    assert good.legal and good.reduction.startswith(f"axis {k_axis} of B")
    assert f"transB={trans_b}" in good.reduction
    bad = only_layer(check(gemm_model(b, 1 - trans_b), tmp_path, "bad.onnx"))
    assert not bad.legal and bad.failed
    assert bad.violating_groups == reference_bad_groups(b, axis=1 - k_axis) > 0


def test_gemm_transb1_rectangular(tmp_path):
    b = prune_24(randn(10, 24), axis=1)  # B[N=10, K=24]
    layer = only_layer(check(gemm_model(b, 1), tmp_path))
    assert layer.legal and layer.shape == (10, 24) and layer.groups == 10 * 6


def test_weight_behind_transpose(tmp_path):
    def model(stored: np.ndarray) -> onnx.ModelProto:
        nodes = [
            helper.make_node("Transpose", ["wt"], ["w"], perm=[1, 0], name="t"),
            mark(helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")),
        ]
        return make_model(
            nodes,
            [numpy_helper.from_array(stored, "wt")],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32])],
            [out("y", TensorProto.FLOAT)],
        )

    stored_ok = prune_24(randn(8, 32), axis=1)  # [N, K] stored, K = axis 1 of the stored tensor
    layer = only_layer(check(model(stored_ok), tmp_path, "ok.onnx"))
    assert layer.legal and layer.weight == "wt" and layer.chain == ["Transpose"]
    assert layer.weight_shape == (32, 8) and layer.shape == (8, 32)
    assert "stored wt[8,32] axis 1" in layer.reduction

    stored_bad = prune_24(randn(8, 32), axis=0)
    layer = only_layer(check(model(stored_bad), tmp_path, "bad.onnx"))
    assert layer.violating_groups == reference_bad_groups(stored_bad, axis=1) > 0


def test_two_transposes_compose(tmp_path):
    stored = prune_24(randn(4, 16, 8), axis=1)  # K is stored axis 1
    nodes = [
        helper.make_node("Transpose", ["ws"], ["a"], perm=[1, 0, 2]),  # [16, 4, 8]
        helper.make_node("Transpose", ["a"], ["w"], perm=[1, 0, 2]),   # back to [4, 16, 8]
        mark(helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")),
    ]
    model = make_model(
        nodes,
        [numpy_helper.from_array(stored, "ws")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 2, 16])],
        [out("y", TensorProto.FLOAT, 3)],
    )
    layer = only_layer(check(model, tmp_path))
    assert layer.legal and layer.chain == ["Transpose", "Transpose"]


def test_constant_cast_dequantize_chain_uses_zero_point(tmp_path):
    # int8 weight whose "zeros" are the zero point 3: the stored tensor has no 0 at all, yet the
    # dequantized weight the MatMul sees is exactly 2:4 down K.
    q = np.random.default_rng(7).integers(10, 100, size=(16, 8)).astype(np.int8)
    pruned = prune_24(q.astype(np.float32), axis=0)
    q = np.where(pruned == 0, 3, q).astype(np.int8)
    assert np.count_nonzero(q) == q.size
    nodes = [
        helper.make_node("Constant", [], ["q"], value=numpy_helper.from_array(q, "qv")),
        helper.make_node("Identity", ["q"], ["q2"]),
        helper.make_node("DequantizeLinear", ["q2", "scale", "zp"], ["wf"]),
        helper.make_node("Cast", ["wf"], ["w"], to=TensorProto.FLOAT16),
        mark(helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")),
    ]
    model = make_model(
        nodes,
        [numpy_helper.from_array(np.array(0.05, np.float32), "scale"),
         numpy_helper.from_array(np.array(3, np.int8), "zp")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 16])],
        [out("y", TensorProto.FLOAT16)],
    )
    layer = only_layer(check(model, tmp_path))
    assert layer.chain == ["Identity", "DequantizeLinear", "Cast"]
    assert layer.dtype == "INT8" and layer.weight == "q"
    assert layer.legal and layer.density == pytest.approx(0.5)


def test_constant_left_operand_reduces_along_last_axis(tmp_path):
    a = prune_24(randn(8, 16), axis=1)  # A[M, K] @ X[K, N]
    node = mark(helper.make_node("MatMul", ["a", "x"], ["y"], name="fc"))
    model = make_model(
        [node], [numpy_helper.from_array(a, "a")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 2])],
        [out("y", TensorProto.FLOAT)],
    )
    layer = only_layer(check(model, tmp_path))
    assert layer.legal and layer.shape == (8, 16) and "A[M,K]" in layer.reduction


def test_k_not_multiple_of_4_is_not_eligible(tmp_path):
    layer = only_layer(report := check(matmul_model(randn(18, 8)), tmp_path))
    assert not layer.eligible and "K=18 is not a multiple of 4" in layer.reason
    assert layer.verdict.startswith("not eligible: K=18")
    assert not report.ok  # it was marked 2:4, and TensorRT cannot run it sparse


def test_matmul_with_computed_weight_is_not_a_layer(tmp_path):
    node = helper.make_node("MatMul", ["x", "z"], ["y"], name="attn")
    model = make_model(
        [node], [],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 4])],
        [out("y", TensorProto.FLOAT)],
    )
    assert check(model, tmp_path).layers == []


def test_marked_node_without_constant_weight_fails(tmp_path):
    node = mark(helper.make_node("MatMul", ["x", "z"], ["y"], name="attn"))
    model = make_model(
        [node], [],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 4])],
        [out("y", TensorProto.FLOAT)],
    )
    layer = only_layer(report := check(model, tmp_path))
    assert layer.node == "attn" and layer.failed and "not a constant" in layer.reason
    assert not report.ok


def test_dequantize_with_computed_scale_is_not_a_constant_weight(tmp_path):
    q = np.ones((16, 8), np.int8)
    nodes = [
        helper.make_node("DequantizeLinear", ["q", "s"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="fc"),
    ]
    model = make_model(
        nodes, [numpy_helper.from_array(q, "q")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
        [out("y", TensorProto.FLOAT)],
    )
    assert check(model, tmp_path).layers == []


# ----------------------------------------------------------------------------- Conv


def conv_flattened_prune(w: np.ndarray) -> np.ndarray:
    """2:4 over [Cin][kh][kw] flattened (CAST-conv / ModelOpt SparseGPT grouping)."""
    flat = w.reshape(w.shape[0], -1)
    return prune_24(flat, axis=1).reshape(w.shape)


def test_conv_pruned_along_cin_is_legal(tmp_path):
    w = prune_24(randn(8, 16, 3, 3), axis=1)
    layer = only_layer(report := check(conv_model(w), tmp_path))
    assert layer.eligible and layer.legal and report.ok
    assert layer.reduction == "Cin at each (kh,kw)"
    assert layer.shape == (8, 16 * 9)
    assert layer.groups == 8 * 9 * 4


def test_rejects_a_conv_weight_pruned_in_the_flattened_grouping(tmp_path):
    w = conv_flattened_prune(randn(8, 16, 3, 3))
    assert np.count_nonzero(w) == w.size // 2  # looks exactly 2:4 by density
    layer = only_layer(report := check(conv_model(w), tmp_path))
    expected = reference_bad_groups(w, axis=1)
    assert expected > 0
    assert layer.violating_groups == expected
    assert not layer.legal and layer.verdict == "VIOLATES 2:4"
    assert not report.ok


def test_conv_weight_stored_hwio_behind_transpose(tmp_path):
    # TF-style [kh, kw, Cin, Cout] weight, Transpose(perm=[3, 2, 0, 1]) → OIHW. The perm is not
    # its own inverse, so mapping the axis with perm.index() instead of perm[] picks Cout.
    def model(stored: np.ndarray) -> onnx.ModelProto:
        nodes = [
            helper.make_node("Transpose", ["w_hwio"], ["w"], perm=[3, 2, 0, 1]),
            mark(helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])),
        ]
        return make_model(
            nodes, [numpy_helper.from_array(stored, "w_hwio")],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
            [out("y", TensorProto.FLOAT, 4)],
        )

    good = prune_24(randn(3, 3, 16, 8), axis=2)  # Cin is stored axis 2
    layer = only_layer(check(model(good), tmp_path, "good.onnx"))
    assert layer.legal and layer.weight_shape == (8, 16, 3, 3)
    assert "stored w_hwio[3,3,16,8] axis 2" in layer.reduction
    bad = prune_24(randn(3, 3, 16, 8), axis=3)  # pruned along Cout
    layer = only_layer(check(model(bad), tmp_path, "bad.onnx"))
    assert layer.violating_groups == reference_bad_groups(bad, axis=2) > 0


def test_grouped_and_depthwise_conv_are_not_eligible(tmp_path):
    grouped = only_layer(check(conv_model(prune_24(randn(8, 4, 3, 3), 1), group=4), tmp_path, "g.onnx"))
    assert not grouped.eligible and grouped.reason.startswith("grouped conv (group=4)")
    assert "no sparse grouped convolution" in grouped.reason
    depthwise = only_layer(check(conv_model(randn(16, 1, 3, 3), group=16, marked=False), tmp_path, "d.onnx"))
    assert not depthwise.eligible and depthwise.reason.startswith("depthwise conv (group=16)")
    assert depthwise.verdict.startswith("not eligible: depthwise")


def test_conv_cin_not_multiple_of_4_is_not_eligible(tmp_path):
    layer = only_layer(check(conv_model(randn(8, 6, 3, 3), marked=False), tmp_path))
    assert not layer.eligible and layer.reason == "Cin=6 is not a multiple of 4"
    assert layer.groups == 0


# ----------------------------------------------------------------------------- I/O and reports


def test_external_data_is_read(tmp_path):
    w = prune_24(randn(64, 16), axis=0)
    path = tmp_path / "ext.onnx"
    onnx.save(matmul_model(w), path, save_as_external_data=True, location="ext.bin", size_threshold=0)
    assert (tmp_path / "ext.bin").stat().st_size == w.nbytes
    layer = only_layer(check_model(path))
    assert layer.legal and layer.groups == 16 * 16


def test_missing_external_data_raises(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(matmul_model(randn(16, 8)), path, save_as_external_data=True, location="ext.bin",
              size_threshold=0)
    (tmp_path / "ext.bin").unlink()
    with pytest.raises(ExternalDataError, match="'w'.*not found"):
        check_model(path)


def test_truncated_external_data_raises(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(matmul_model(randn(16, 8)), path, save_as_external_data=True, location="ext.bin",
              size_threshold=0)
    data = (tmp_path / "ext.bin").read_bytes()
    (tmp_path / "ext.bin").write_bytes(data[:100])
    with pytest.raises(ExternalDataError, match="truncated"):
        check_model(path)


def test_bad_inputs_raise_one_line_errors(tmp_path):
    with pytest.raises(InvalidModelError, match="no such file"):
        check_model(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\xfe this is not a protobuf \x00\x01" * 8)
    with pytest.raises(InvalidModelError) as info:
        check_model(junk)
    assert "\n" not in str(info.value)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(InvalidModelError, match="not an ONNX model"):
        check_model(empty)


def test_to_dict_is_json_and_render_table(tmp_path):
    nodes = [
        mark(helper.make_node("MatMul", ["x", "w1"], ["h"], name="good")),
        mark(helper.make_node("MatMul", ["h", "w2"], ["h2"], name="wrong_axis")),
        helper.make_node("MatMul", ["h2", "w3"], ["y"], name="dense"),
    ]
    model = make_model(
        nodes,
        [numpy_helper.from_array(prune_24(randn(16, 16, seed=1), 0), "w1"),
         numpy_helper.from_array(prune_24(randn(16, 16, seed=2), 1), "w2"),
         numpy_helper.from_array(randn(16, 8, seed=3), "w3")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [out("y", TensorProto.FLOAT)],
    )
    report = check(model, tmp_path)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is False
    assert data["summary"] == {"layers": 3, "marked": 2, "legal": 1, "failed": 1, "not_eligible": 0}
    assert [layer["verdict"] for layer in data["layers"]] == ["2:4 ✓", "VIOLATES 2:4", "dense"]
    assert data["layers"][1]["shape"] == [16, 16]

    from rich.console import Console

    console = Console(file=io.StringIO(), width=220, record=True, color_system=None)
    render_check_table(report, console)
    text = console.export_text()
    for expected in ("good", "wrong_axis", "dense", "2:4 ✓", "VIOLATES 2:4", "axis 0 of W[K,N]", "FAILED"):
        assert expected in text


def test_count_24_violations_matches_reference():
    w = randn(8, 12, 5)
    w[np.random.default_rng(3).random(w.shape) < 0.5] = 0.0
    for axis in (0, 1):
        assert count_24_violations(w, axis) == (w.size // 4, reference_bad_groups(w, axis))
    with pytest.raises(ValueError):
        count_24_violations(w, 2)


# ----------------------------------------------------------------------------- Polygraphy


def _polygraphy_verdicts(path: Path) -> dict[str, bool]:
    """Run `polygraphy inspect sparsity` (pure Python, no TensorRT) and parse its per-tensor lines."""
    pytest.importorskip("polygraphy")
    code = "import sys; from polygraphy.tools import main; sys.argv[0] = 'polygraphy'; sys.exit(main())"
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code, "inspect", "sparsity", str(path)],
        capture_output=True, text=True, timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    verdicts = {m.group(2): m.group(1) == "sparse" for m in re.finditer(r"Found (sparse|non-sparse) tensor: (\S+)", out)}
    assert verdicts, out
    return verdicts


def _polygraphy_model(sparse: bool) -> onnx.ModelProto:
    """One weight per layout polygraphy and we both cover, all pruned along TensorRT's axis or not at all."""
    p = (lambda w, axis: prune_24(w, axis)) if sparse else (lambda w, axis: w)
    nodes = [
        helper.make_node("MatMul", ["x", "mm_w"], ["a"], name="mm"),
        helper.make_node("Gemm", ["a", "gemm_b1"], ["b"], name="gemm_t1", transB=1),
        helper.make_node("Gemm", ["b", "gemm_b0"], ["c"], name="gemm_t0", transB=0),
        helper.make_node("Transpose", ["tr_w"], ["tr_wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["c", "tr_wt"], ["d"], name="mm_transposed"),
        helper.make_node("Reshape", ["d", "shape"], ["img"]),
        helper.make_node("Conv", ["img", "conv_w"], ["e"], name="conv", pads=[1, 1, 1, 1]),
    ]
    inits = [
        numpy_helper.from_array(p(randn(32, 16, seed=1), 0), "mm_w"),
        numpy_helper.from_array(p(randn(24, 16, seed=2), 1), "gemm_b1"),
        numpy_helper.from_array(p(randn(24, 32, seed=3), 0), "gemm_b0"),
        numpy_helper.from_array(p(randn(64, 32, seed=4), 1), "tr_w"),
        numpy_helper.from_array(np.array([1, 16, 2, 2], np.int64), "shape"),
        numpy_helper.from_array(p(randn(8, 16, 3, 3, seed=5), 1), "conv_w"),
    ]
    return make_model(
        nodes, inits,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])],
        [out("e", TensorProto.FLOAT, 4)],
    )


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_agrees_with_polygraphy_inspect_sparsity(tmp_path, sparse):
    path = tmp_path / ("sparse.onnx" if sparse else "dense.onnx")
    onnx.save(_polygraphy_model(sparse), path)
    ours = {layer.weight: layer.legal for layer in check_model(path).layers}
    theirs = _polygraphy_verdicts(path)
    assert set(ours) == {"mm_w", "gemm_b1", "gemm_b0", "tr_w", "conv_w"}
    assert theirs == ours
    assert all(v is sparse for v in ours.values())


def test_agrees_with_polygraphy_on_wrong_axis_and_flattened_conv(tmp_path):
    # Each weight here is exactly 50 % zeros but pruned along the wrong grouping.
    nodes = [
        helper.make_node("MatMul", ["x", "mm_w"], ["a"], name="mm"),
        helper.make_node("Gemm", ["a", "gemm_b1"], ["b"], name="gemm_t1", transB=1),
        helper.make_node("Reshape", ["b", "shape"], ["img"]),
        helper.make_node("Conv", ["img", "conv_w"], ["e"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["e", "conv_ok"], ["f"], name="conv_ok", pads=[1, 1, 1, 1]),
    ]
    inits = [
        numpy_helper.from_array(prune_24(randn(32, 16, seed=1), 1), "mm_w"),
        numpy_helper.from_array(prune_24(randn(16, 16, seed=2), 0), "gemm_b1"),
        numpy_helper.from_array(np.array([1, 16, 2, 2], np.int64), "shape"),
        numpy_helper.from_array(conv_flattened_prune(randn(8, 16, 3, 3, seed=5)), "conv_w"),
        numpy_helper.from_array(prune_24(randn(8, 8, 3, 3, seed=6), 1), "conv_ok"),
    ]
    model = make_model(
        nodes, inits,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])],
        [out("f", TensorProto.FLOAT, 4)],
    )
    path = tmp_path / "wrong.onnx"
    onnx.save(model, path)
    ours = {layer.weight: layer.legal for layer in check_model(path).layers}
    assert ours == {"mm_w": False, "gemm_b1": False, "conv_w": False, "conv_ok": True}
    assert _polygraphy_verdicts(path) == ours


def test_checker_modules_stay_independent_of_the_rewrite_code():
    """The checker re-derives every axis itself: neither of its modules may import onnx_ir,
    mpcompile.numerics or mpcompile.passes (the code that writes the masks)."""
    import ast
    from pathlib import Path

    import mpcompile.checks.checker as checker_mod

    folder = Path(checker_mod.__file__).parent
    for name in ("checker.py", "checker_graph.py"):
        tree = ast.parse((folder / name).read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert "onnx" in imported
        forbidden = {m for m in imported if m.startswith(("onnx_ir", "mpcompile.numerics", "mpcompile.passes"))}
        assert not forbidden, (name, forbidden)
