"""Tests for mpcompile.trt: build-log and inspector parsing, layer→ONNX mapping, the speedup
model, and the TensorRT/torch glue as far as it runs without a GPU.

The log / inspector fixtures under ``tests/fixtures/trt/`` are hand-written following
TensorRT's documented formats (see the README there), not captured from a real build. The
roofline expectations are recomputed here by hand from the formula with round numbers, not read
back from the module. What the build asks Polygraphy/TensorRT for is tested in ``test_trt_polygraphy.py``; the
real-TensorRT and real-CUDA tests are marked ``gpu`` and skip without them.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mpcompile.errors import (
    BackendUnavailableError,
    MpcompileError,
    UsageError,
)
from mpcompile.trt import builder as trt_builder
from mpcompile.trt import gpu_probe
from mpcompile.trt.builder import BuildConfig, build_engine, gpu_available, parse_profile_spec
from mpcompile.trt.inspector import (
    load_engine_info,
    map_layer_name,
    metadata_onnx_nodes,
    onnx_node_index,
    parse_engine_info,
    sparsity_table,
)
from mpcompile.trt.log_parse import (
    decode_trt_version_number,
    parse_build_log,
    parse_build_log_file,
    split_layer_list,
)
from mpcompile.trt.model import (
    GPUS,
    GpuSpec,
    LayerShape,
    amdahl_bound,
    find_gpu_spec,
    gemm_time_us,
    gpu_spec,
    model_speedup,
    predict_sparse_pick,
)
from mpcompile.trt.stats import latency_stats
from mpcompile.trt.torch_audit import audit_linear_layers, is_24_along_rows

FIXTURES = Path(__file__).parent / "fixtures" / "trt"
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _cuda_torch() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# ----------------------------------------------------------------------------- build log


def test_trtexec_log_lists_versions_and_wrapped_names():
    log = parse_build_log_file(FIXTURES / "trtexec_sparse_verbose.log")
    assert log.eligible_layers == [
        "Conv_0 + Relu_1", "/fc1/MatMul", "/fc2/MatMul", "PWN(/conv2/Conv, /act/Mul)",
        "MatMul_13",  # "Mat" + newline + "Mul_13": a terminal wrap, joined back
        "squeeze_after_/fc3/MatMul",
    ]
    assert log.picked_sparse_layers == ["Conv_0 + Relu_1", "/fc2/MatMul"]
    assert log.eligible_not_picked == ["/fc1/MatMul", "PWN(/conv2/Conv, /act/Mul)", "MatMul_13",
                                       "squeeze_after_/fc3/MatMul"]
    assert log.tensorrt_version == "10.3.0"
    assert log.eligible_line_found and log.picked_line_found
    assert len(log.errors) == 1 and "hand-written error" in log.errors[0]


def test_python_logger_one_per_line_and_empty_picked_list():
    log = parse_build_log_file(FIXTURES / "python_logger_build.log")
    assert log.eligible_layers == [
        "/encoder/layer.0/attention/self/query/MatMul",
        "/encoder/layer.0/intermediate/dense/MatMul",
        "{ForeignNode[/encoder/layer.1/attention/self/query/MatMul.../encoder/layer.1/output/dense/MatMul]}",
    ]
    assert log.picked_line_found and log.picked_sparse_layers == []
    assert log.tensorrt_version is None


def test_missing_lines_are_not_empty_lists():
    log = parse_build_log("[11/22/2026-10:00:00] [I] [TRT] Loaded engine size: 3 MiB\n")
    assert not log.eligible_line_found and not log.picked_line_found
    assert log.eligible_layers == [] and log.picked_sparse_layers == []


def test_repeated_builds_merge_without_duplicates_and_own_logger_prefix():
    text = (
        "[TRT] [I] (Sparsity) Layers eligible for sparse math: a, b\n"
        "[TRT] [I] (Sparsity) TRT inference plan picked sparse implementation for layers: b\n"
        "[TRT] [I] (Sparsity) Layers eligible for sparse math: b, c\n"
        "[TRT] [I] (Sparsity) TRT inference plan picked sparse implementation for layers: c\n"
    )
    log = parse_build_log(text)
    assert log.eligible_layers == ["a", "b", "c"]
    assert log.picked_sparse_layers == ["b", "c"]


def test_split_layer_list_keeps_bracketed_commas_and_normalises_plus():
    assert split_layer_list(" A+B , PWN(PWN(x), y),{ForeignNode[p...q]}, ") == [
        "A + B", "PWN(PWN(x), y)", "{ForeignNode[p...q]}"]


@pytest.mark.parametrize("number, text", [(100300, "10.3.0"), (101500, "10.15.0"), (8601, "8.6.1"),
                                          (110000, "11.0.0")])
def test_decode_trt_version_number(number, text):
    assert decode_trt_version_number(number) == text


# ----------------------------------------------------------------------------- inspector


def test_detailed_engine_info_fields():
    info = load_engine_info(FIXTURES / "engine_detailed.json")
    assert info.detailed and info.profiles == 2
    assert info.bindings == ["input", "output"]
    assert [layer.name for layer in info.layers][:4] == [
        "Reformatting CopyNode for Input Tensor 0 to Conv_0 + Relu_1", "Conv_0 + Relu_1",
        "/fc1/MatMul", "/fc2/MatMul"]
    assert len(info.layers) == 7  # profile-1 copies dropped
    conv = info.layer("Conv_0 + Relu_1")
    assert conv.layer_type == "CaskConvolution" and conv.parameter_type == "Convolution"
    assert conv.has_sparse_weights is True and conv.sparse_tactic
    assert conv.precision == "FP16" and conv.onnx_nodes == ["Conv_0", "Relu_1"]
    assert conv.outputs[0].dimensions == [8, 256, 56, 56]
    fc1 = info.layer("/fc1/MatMul")
    assert fc1.has_sparse_weights is True and not fc1.sparse_tactic  # eligible, dense kernel
    assert info.layer("Reformatting CopyNode for Input Tensor 0 to Conv_0 + Relu_1").precision == "FP32"
    myelin = info.layer("{ForeignNode[/blocks.0/q/MatMul.../blocks.0/fc2/MatMul]}")
    assert myelin.precision is None and myelin.has_sparse_weights is None and myelin.tactic_name is None


def test_profile_selection_and_names_only():
    second = load_engine_info(FIXTURES / "engine_detailed.json", profile=1)
    assert [layer.name for layer in second.layers] == ["Conv_0 + Relu_1", "/fc1/MatMul"]
    assert not any(layer.sparse_tactic for layer in second.layers)
    assert second.bindings == ["input", "output"]
    with pytest.raises(UsageError, match="profile 3"):
        load_engine_info(FIXTURES / "engine_detailed.json", profile=3)
    names = load_engine_info(FIXTURES / "engine_names_only.json")
    assert not names.detailed and len(names.layers) == 7
    assert all(layer.tactic_name is None for layer in names.layers)


def test_trt11_split_datatype_and_format_fields():
    info = parse_engine_info(json.dumps({"Layers": [{
        "Name": "/fc/MatMul", "LayerType": "gemm", "HasSparseWeights": 1,
        "Inputs": [{"Name": "x", "Dimensions": [8, 64], "Datatype": "Half", "Format": "Row major linear"}],
        "TacticName": "sm80_xmma_gemm_sparse_f16f16"}]}))
    (layer,) = info.layers
    assert layer.inputs[0].format == "Half Row major linear" and layer.precision == "FP16"


def test_bad_layer_info_is_a_one_line_error():
    with pytest.raises(MpcompileError, match="not valid JSON"):
        parse_engine_info("{not json")
    with pytest.raises(MpcompileError, match='no "Layers"'):
        parse_engine_info(json.dumps({"layers": []}))


def test_metadata_separators():
    assert metadata_onnx_nodes("[ONNX Layer: /a/Conv]\x1e[ONNX Layer: /a/Relu]\x1f[ONNX Layer: b]") == [
        "/a/Conv", "/a/Relu", "b"]
    assert metadata_onnx_nodes("[ONNX Layer: q][ONNX Layer: k]") == ["q", "k"]
    assert metadata_onnx_nodes(None) == []


# ----------------------------------------------------------------------------- name mapping

NODES = ["/patch/Conv", "Conv_0", "Relu_1", "/fc1/MatMul", "/fc3/MatMul", "/act/Sigmoid", "/act/Mul",
         "/blocks.0/q/MatMul", "/blocks.0/k/MatMul", "/blocks.0/Softmax", "/blocks.0/fc2/MatMul",
         "MatMul_1", "MatMul_13"]


@pytest.mark.parametrize("trt_name, expected", [
    ("Conv_0 + Relu_1", ["Conv_0", "Relu_1"]),
    ("Conv_0 + Relu_1 [profile 2]", ["Conv_0", "Relu_1"]),
    ("PWN(PWN(/act/Sigmoid), /act/Mul)", ["/act/Sigmoid", "/act/Mul"]),
    ("/fc1/MatMul_output", ["/fc1/MatMul"]),
    ("/fc1/MatMul [Convolution]", ["/fc1/MatMul"]),
    ("squeeze_after_/fc3/MatMul", ["/fc3/MatMul"]),
    ("MatMul_13", ["MatMul_13"]),
    ("copy_of_MatMul_13", ["MatMul_13"]),  # not "MatMul_1": the match must end at a name boundary
    ("{ForeignNode[/blocks.0/q/MatMul.../blocks.0/fc2/MatMul]}",
     ["/blocks.0/q/MatMul", "/blocks.0/k/MatMul", "/blocks.0/Softmax", "/blocks.0/fc2/MatMul"]),
])
def test_map_layer_name(trt_name, expected):
    matched, unmatched = map_layer_name(trt_name, set(NODES), NODES)
    assert matched == expected and unmatched == []


def test_map_layer_name_unmatched_and_without_node_list():
    matched, unmatched = map_layer_name("Reformatting CopyNode for Input Tensor 0 to Conv_0 + Relu_1",
                                        set(NODES), NODES)
    assert matched == [] and unmatched
    matched, unmatched = map_layer_name("MatMul_99 + Conv_0", set(NODES), NODES)
    assert matched == ["Conv_0"] and unmatched == ["MatMul_99"]
    # "MatMul_1" is inside "MatMul_17_copy" but not at a name boundary: no match.
    assert map_layer_name("MatMul_17_copy", set(NODES), NODES) == ([], ["MatMul_17_copy"])
    # Without an order a Myelin range gives its two ends; without a node list tokens are cleaned.
    assert map_layer_name("{ForeignNode[/blocks.0/q/MatMul.../blocks.0/fc2/MatMul]}", set(NODES))[0] == [
        "/blocks.0/q/MatMul", "/blocks.0/fc2/MatMul"]
    assert map_layer_name("a_output + PWN(b, c)")[0] == ["a", "b", "c"]
    # Metadata wins over the layer name.
    assert map_layer_name("__myl_Fused_0", set(NODES), NODES, "[ONNX Layer: /fc1/MatMul]")[0] == ["/fc1/MatMul"]


def test_sparsity_table_joins_log_and_inspector():
    ops = {n: ("Conv" if n.endswith("Conv") or n.startswith("Conv") else
               "MatMul" if "MatMul" in n else "Other") for n in NODES + ["/fc2/MatMul", "/conv2/Conv"]}
    info = load_engine_info(FIXTURES / "engine_detailed.json")
    log = parse_build_log_file(FIXTURES / "trtexec_sparse_verbose.log")
    pruned = ["Conv_0", "/fc1/MatMul", "/fc2/MatMul", "MatMul_1", "/blocks.0/q/MatMul"]
    table = sparsity_table(pruned, info, log, ops)
    status = {row.onnx_node: row.status for row in table.rows}
    assert status == {
        "Conv_0": "sparse",                         # picked in the log and a sparse tactic
        "/fc1/MatMul": "pruned-but-dense",           # HasSparseWeights=1, dense tactic
        "/fc2/MatMul": "sparse",
        "MatMul_1": "pruned-not-found",              # no layer mentions it (MatMul_13 must not count)
        "/blocks.0/q/MatMul": "pruned-not-eligible",  # inside a Myelin region, no evidence
        "MatMul_13": "eligible-not-pruned",
        "/fc3/MatMul": "eligible-not-pruned",
        "/conv2/Conv": "eligible-not-pruned",        # from the PWN(...) log entry; /act/Mul is no GEMM
    }
    conv = table.row("Conv_0")
    assert conv.trt_layers == ["Conv_0 + Relu_1"] and conv.precision == "FP16"
    assert any("sparse" in t for t in conv.tactic_names)
    assert table.pruned_but_dense == ["/fc1/MatMul", "MatMul_1", "/blocks.0/q/MatMul"]
    assert table.counts()["sparse"] == 2
    assert table.unmapped_layers == []
    assert json.loads(json.dumps(table.to_dict()))["counts"]["eligible-not-pruned"] == 3


def test_sparsity_table_from_log_only_without_node_list():
    log = parse_build_log("[I] [TRT] (Sparsity) Layers eligible for sparse math: fc_a, fc_b_output\n"
                          "[I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: fc_b_output\n")
    table = sparsity_table(["fc_a", "fc_b"], log=log)
    assert [(r.onnx_node, r.status) for r in table.rows] == [("fc_a", "pruned-but-dense"), ("fc_b", "sparse")]


# ----------------------------------------------------------------------------- speedup model

FAKE = GpuSpec("fake", fp16_dense_tflops=100.0, fp16_sparse_tflops=200.0, bandwidth_gbs=1000.0, sm=(8, 0))


def test_roofline_compute_bound_by_hand():
    # 4096³ GEMM: 2·4096³ = 137,438,953,472 FLOP; at 100 TFLOP/s = 1374.39 µs, at 200 = 687.19 µs.
    # Bytes dense 2·3·4096² = 100,663,296 → 100.66 µs at 1000 GB/s, so compute bound both ways.
    layer = LayerShape("big", 4096, 4096, 4096)
    assert gemm_time_us(layer, FAKE, sparse=False) == pytest.approx(137_438_953_472 / 100e12 * 1e6)
    assert gemm_time_us(layer, FAKE, sparse=True) == pytest.approx(137_438_953_472 / 200e12 * 1e6)
    assert gemm_time_us(layer, FAKE, sparse=False) == pytest.approx(1374.389535, rel=1e-9)


def test_roofline_memory_bound_by_hand():
    # One row against a 4096×4096 weight: 33.5 MFLOP (0.34 µs) but 2·(4096 + 4096² + 4096) bytes.
    layer = LayerShape("gemv", 1, 4096, 4096)
    dense_bytes = 2 * (4096 + 4096 * 4096 + 4096)
    sparse_bytes = 2 * (4096 + 4096) + 4096 * 4096 * (1 + 1 / 8)  # half the values + 2-bit index each
    assert gemm_time_us(layer, FAKE, False) == pytest.approx(dense_bytes / 1e12 * 1e6)
    assert gemm_time_us(layer, FAKE, True) == pytest.approx(sparse_bytes / 1e12 * 1e6)
    assert gemm_time_us(layer, FAKE, False) / gemm_time_us(layer, FAKE, True) == pytest.approx(1.7768, abs=1e-3)


def test_end_to_end_by_hand_with_other_fraction():
    big = LayerShape("big", 4096, 4096, 4096, sparse=True)
    kept = LayerShape("kept", 4096, 4096, 4096, sparse=False)
    result = model_speedup([big, kept], FAKE, other_fraction=0.2, apply_pick_prediction=False)
    d = 137_438_953_472 / 100e12 * 1e6  # µs per dense GEMM
    other = 2 * d * 0.2 / 0.8
    total_dense, total_sparse = 2 * d + other, d / 2 + d + other
    assert result.kind == "modeled" and result.gpu == "fake"
    assert result.other_us == pytest.approx(other)
    assert result.speedup == pytest.approx(total_dense / total_sparse)
    f = d / total_dense
    assert result.sparse_fraction == pytest.approx(f)
    assert result.amdahl_bound == pytest.approx(1 / ((1 - f) + f / 2))
    assert result.speedup == pytest.approx(result.amdahl_bound)  # compute bound: exactly 2× on "big"
    rows = result.to_dict()["per_layer"]
    assert [r["name"] for r in rows] == ["big", "kept"]
    assert rows[0]["sparse_us"] == pytest.approx(d / 2) and rows[1]["sparse_us"] == pytest.approx(d)


def test_other_time_given_in_us_and_speedup_never_beats_bound():
    rng = np.random.default_rng(3)
    layers = [LayerShape(f"l{i}", int(rng.integers(1, 20000)), int(rng.integers(1, 64)) * 64,
                         int(rng.integers(1, 64)) * 64, bool(rng.integers(0, 2))) for i in range(40)]
    for gpu in list(GPUS.values()) + [FAKE]:
        for kwargs in ({"other_fraction": 0.0}, {"other_fraction": 0.5}, {"other_us": 123.0}):
            result = model_speedup(layers, gpu, **kwargs)
            assert 1.0 <= result.speedup <= result.amdahl_bound + 1e-12
    fixed = model_speedup(layers[:3], FAKE, other_us=50.0)
    assert fixed.other_us == 50.0 and fixed.other_fraction is None
    assert fixed.total_dense_us == pytest.approx(fixed.gemm_dense_us + 50.0)


def test_amdahl_bound():
    assert amdahl_bound(1.0) == 2.0
    assert amdahl_bound(0.0) == 1.0
    assert amdahl_bound(0.5) == pytest.approx(1 / 0.75)
    with pytest.raises(UsageError):
        amdahl_bound(1.5)


def test_model_input_validation():
    with pytest.raises(UsageError):
        model_speedup([], FAKE)
    with pytest.raises(UsageError):
        model_speedup([LayerShape("x", 0, 16, 16)], FAKE)
    with pytest.raises(UsageError):
        model_speedup([LayerShape("x", 1, 16, 16)], FAKE, other_fraction=1.0)
    with pytest.raises(UsageError, match="no datasheet"):
        gpu_spec("Voodoo2")


@pytest.mark.parametrize("layer, gpu, picked, reason", [
    (LayerShape("a", 4096, 1024, 1024), FAKE, True, "compute bound"),
    (LayerShape("a", 4096, 1024, 1024, sparse=False), FAKE, False, "not marked"),
    (LayerShape("a", 4096, 1024, 1024), GpuSpec("T4", 65, 65, 320, (7, 5)), False, "no sparse tensor cores"),
    (LayerShape("a", 4096, 1026, 1024), FAKE, False, "multiple of 4"),
    (LayerShape("a", 4096, 1028, 1024), FAKE, False, "multiples of 16"),
    (LayerShape("a", 4096, 128, 1024), FAKE, False, "256 channels"),
    (LayerShape("a", 8, 1024, 1024), FAKE, False, "memory bound"),
])
def test_predict_sparse_pick(layer, gpu, picked, reason):
    ok, why = predict_sparse_pick(layer, gpu)
    assert ok is picked and reason in why


def test_pick_prediction_keeps_memory_bound_layers_dense():
    small = LayerShape("small", 8, 1024, 1024)
    with_pred = model_speedup([small], FAKE, other_fraction=0.0)
    without = model_speedup([small], FAKE, other_fraction=0.0, apply_pick_prediction=False)
    assert with_pred.speedup == 1.0 and with_pred.per_layer[0].predicted_pick is False
    assert without.speedup > 1.5  # the roofline alone credits the smaller 2:4 weight read


def test_gpu_table_and_device_names():
    for spec in GPUS.values():
        assert spec.fp16_sparse_tflops == pytest.approx(2 * spec.fp16_dense_tflops, rel=0.01)
        assert spec.has_sparse_tensor_cores
    assert find_gpu_spec("NVIDIA A100-SXM4-80GB").bandwidth_gbs == 2039.0
    assert find_gpu_spec("NVIDIA A100-SXM4-40GB").bandwidth_gbs == 1555.0
    assert find_gpu_spec("NVIDIA H100 80GB HBM3").name == "H100-SXM"
    assert find_gpu_spec("NVIDIA H200").name == "H200"
    assert find_gpu_spec("NVIDIA A40").name == "A40"
    assert find_gpu_spec("NVIDIA L4").name == "L4"
    assert find_gpu_spec("NVIDIA L40S") is None


# ----------------------------------------------------------------------------- stats


def test_latency_stats():
    stats = latency_stats(np.arange(1, 11, dtype=float))
    assert stats.median_ms == 5.5 and stats.mean_ms == 5.5 and stats.min_ms == 1.0
    assert stats.p10_ms == pytest.approx(1.9) and stats.p90_ms == pytest.approx(9.1)
    assert stats.samples == 10 and stats.kind == "measured"
    with pytest.raises(UsageError):
        latency_stats([])


# ----------------------------------------------------------------------------- builder glue


def test_gpu_available_never_raises_and_says_why():
    ok, reason = gpu_available()
    assert isinstance(ok, bool) and isinstance(reason, str) and reason
    if not HAS_TENSORRT:
        assert not ok and "TensorRT is not installed" in reason


def test_gpu_available_survives_a_broken_probe(monkeypatch):
    def boom():
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(gpu_probe, "cuda_devices", boom)
    ok, reason = gpu_available(require_tensorrt=False)
    assert ok is False and "driver exploded" in reason


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message shown when TensorRT is missing")
def test_missing_tensorrt_is_one_line(tmp_path):
    with pytest.raises(BackendUnavailableError) as info:
        build_engine(tmp_path / "m.onnx", BuildConfig(), tmp_path / "m.engine")
    message = str(info.value)
    assert message.startswith("TensorRT is not installed (pip install 'mpcompile[gpu]'); ")
    assert "\n" not in message


@pytest.mark.parametrize("spec, expected", [
    ("input:1x128,8x128,32x128", ("input", (1, 128), (8, 128), (32, 128))),
    ("input:1x3x8x8", ("input", (1, 3, 8, 8), (1, 3, 8, 8), (1, 3, 8, 8))),
    ("input:1,3,8,8", ("input", (1, 3, 8, 8), (1, 3, 8, 8), (1, 3, 8, 8))),
    ("ids:4x,8x,16x", ("ids", (4,), (8,), (16,))),
    ("ns:a:1x2", ("ns:a", (1, 2), (1, 2), (1, 2))),
])
def test_parse_profile_spec(spec, expected):
    p = parse_profile_spec(spec)
    assert (p.name, p.min, p.opt, p.max) == expected


@pytest.mark.parametrize("spec", ["input", "input:", "input:1x2,3x4", "input:8x1,4x1,16x1", "input:1x2,1x2x3,1x2",
                                  "input:axb"])
def test_parse_profile_spec_errors(spec):
    with pytest.raises(UsageError):
        parse_profile_spec(spec)


# ----------------------------------------------------------------------------- torch audit


def test_is_24_along_rows():
    w = np.array([[1, 0, 2, 0, 0, 0, 3, 4]], dtype=np.float16)
    assert is_24_along_rows(w)
    assert not is_24_along_rows(np.array([[1, 1, 1, 0]], dtype=np.float16))
    assert not is_24_along_rows(np.ones((2, 6)))  # not a multiple of 4


def test_torch_audit_rejects_dense_weights_before_touching_cuda():
    with pytest.raises(UsageError, match="not 2:4"):
        audit_linear_layers([("dense", np.ones((16, 16), np.float16), 8)])


@pytest.mark.skipif(_cuda_torch(), reason="checks the message shown without CUDA")
def test_torch_audit_without_cuda_is_backend_unavailable():
    pytest.importorskip("torch")
    w = np.tile(np.array([1, 0, 1, 0], np.float16), (16, 4))
    with pytest.raises(BackendUnavailableError, match="CUDA is not available"):
        audit_linear_layers([("fc", w, 16)])


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_torch(), reason="needs a CUDA build of torch and an NVIDIA GPU")
def test_torch_audit_on_gpu():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((1024, 1024)).astype(np.float16)
    groups = w.reshape(1024, -1, 4)
    order = np.argsort(np.abs(groups), axis=2)
    np.put_along_axis(groups, order[:, :, :2], 0, axis=2)
    audit = audit_linear_layers([("fc", groups.reshape(1024, 1024), 4096)], warmup=3, iters=10)
    layer = audit.layers[0]
    assert layer.dense.median_ms > 0 and audit.environment["gpu"]
    if layer.sparse is not None:
        assert layer.max_abs_diff is not None and layer.max_abs_diff < 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TENSORRT, reason="needs TensorRT (pip install 'mpcompile[gpu]') and a GPU")
def test_real_tensorrt_build_reports_sparsity(tmp_path):
    ok, reason = gpu_available()
    if not ok:
        pytest.skip(reason)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((1024, 1024)).astype(np.float16)
    groups = w.reshape(-1, 4, 1024)  # MatMul(X, W[K, N]): groups of 4 run down K (axis 0)
    order = np.argsort(np.abs(groups), axis=1)
    np.put_along_axis(groups, order[:, :2, :], 0, axis=1)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/fc/MatMul")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [4096, 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [4096, 1024])],
        [numpy_helper.from_array(groups.reshape(1024, 1024), "w")])
    model = tmp_path / "fc.onnx"
    onnx.save(helper.make_model(graph), str(model))
    result = build_engine(model, BuildConfig(sparse=True), tmp_path / "fc.engine")
    assert result.log.eligible_line_found, result.log_path.read_text()[-2000:]
    assert result.engine.detailed and result.engine.layers
    assert "TensorRT version" in result.log_path.read_text() and result.layer_info_path.is_file()
    row = sparsity_table(["/fc/MatMul"], result.engine, result.log, onnx_node_index(model)).row("/fc/MatMul")
    assert row.eligible and row.status in ("sparse", "pruned-but-dense")
    stats = trt_builder.time_engine(result.engine_path, {"x": np.ones((4096, 1024), np.float16)},
                                    warmup=3, iters=10)
    assert stats.median_ms > 0


# ----------------------------------------------------------------------------- benchmarks/gpu_audit.py


def _gpu_audit_module():
    root = Path(__file__).resolve().parent.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks import gpu_audit

    return gpu_audit


def test_gpu_audit_workload_shapes():
    ga = _gpu_audit_module()
    minilm = ga.minilm_l6()
    assert len(minilm) == 36 and {(g.out_features, g.in_features) for g in minilm} == {
        (384, 384), (1536, 384), (384, 1536)}
    vit = ga.vit_b16()
    assert len(vit) == 1 + 6 * 12 + 1 and not vit[0].sparse and vit[1].rows_per_sample == 197
    mlp = ga.bundled_gemms("digits_mlp")
    assert [(g.out_features, g.in_features, g.rows_per_sample) for g in mlp] == [(128, 64, 1), (64, 128, 1), (10, 64, 1)]
    cnn = {g.name: g for g in ga.bundled_gemms("digits_cnn")}
    depthwise = cnn["/features/features.3/Conv"]
    assert not depthwise.sparse and "group=64" in depthwise.why_dense
    assert cnn["/features/features.1/features.1.0/Conv"].in_features == 16 * 9
    w = ga.prune_24(np.random.default_rng(0).standard_normal((8, 16)))
    assert is_24_along_rows(w) and np.count_nonzero(w) == 8 * 16 // 2


def test_gpu_audit_measured_summary_by_hand():
    ga = _gpu_audit_module()
    gemms = [ga.Gemm("a", 64, 64, 4), ga.Gemm("b", 32, 64, 4), ga.Gemm("c", 64, 64, 4, sparse=False)]
    timed = {
        "64x64@8": {"dense": {"median_ms": 2.0}, "sparse": {"median_ms": 1.0}},
        "32x64@8": {"dense": {"median_ms": 1.0}, "sparse": {"median_ms": 1.5}},  # 2:4 slower here
    }
    s = ga.measured_summary(gemms, batch=2, timed=timed)
    # dense 2 + 1 + 2 = 5; all-sparse 1 + 1.5 + 2 (c stays dense) = 4.5; best-of 1 + 1 + 2 = 4
    assert s["gemm_dense_ms"] == 5.0 and s["gemm_sparse_ms"] == 4.5 and s["gemm_best_of_ms"] == 4.0
    assert s["sparse_fraction_of_gemm_time"] == pytest.approx(3 / 5)
    assert s["amdahl_bound_gemm_only"] == pytest.approx(1 / (0.4 + 0.3))


def test_gpu_audit_main_without_cuda_or_with_a_fake_audit(tmp_path, monkeypatch, capsys):
    ga = _gpu_audit_module()
    import mpcompile.trt.torch_audit as ta

    if not _cuda_torch():
        assert ga.main(["--quick", "--out", str(tmp_path / "none.json")]) == 6
        assert "no CUDA" in capsys.readouterr().out and not (tmp_path / "none.json").exists()

    def fake_env():
        return {"gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0", "torch": "t", "cuda": "c"}

    def fake_audit(layers, **kwargs):
        rows = []
        for name, w, m in layers:
            n, k = w.shape
            dense = latency_stats([1e-9 * m * k * n] * 3)
            sparse = latency_stats([0.6e-9 * m * k * n] * 3)
            rows.append(ta.AuditLayer(name, m, k, n, dense, sparse, dense.median_ms / sparse.median_ms,
                                      "cuSPARSELt", 0.0))
        return ta.TorchAudit(rows, fake_env(), kwargs["warmup"], kwargs["iters"], kwargs["inner"])

    monkeypatch.setattr(ta, "cuda_environment", fake_env)
    monkeypatch.setattr(ta, "audit_linear_layers", fake_audit)
    out = tmp_path / "audit.json"
    assert ga.main(["--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["environment"]["gpu"] == "NVIDIA A100-SXM4-80GB" and report["gpu_spec"]["name"] == "A100-SXM4-80GB"
    vit = report["workloads"]["ViT-B/16"]["32"]
    assert vit["modeled"]["kind"] == "modeled" and vit["modeled"]["speedup"] <= vit["modeled"]["amdahl_bound"]
    assert vit["measured"]["gemm_speedup_all_sparse"] == pytest.approx(1 / 0.6, rel=0.02)
    assert set(vit["modeled_reference"]) == {"A40", "A100-SXM4-80GB"}
