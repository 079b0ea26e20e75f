"""The bundled digits models: valid ONNX, the accuracies models.json records, torch parity."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from mpcompile.errors import MpcompileError
from mpcompile.zoo.bundled import (
    BUNDLED_MODELS,
    bundled_info,
    bundled_model_path,
    bundled_weights_path,
    evaluate_onnx_accuracy,
    load_digits_split,
    write_split_npz,
)

# Floors from the task: the rewrites are judged against models that actually work.
MIN_ACCURACY = {"digits_cnn": 0.95, "digits_vit": 0.93, "digits_mlp": 0.93}


def _session(name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(bundled_model_path(name)), providers=["CPUExecutionProvider"])


def _test_inputs(name: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits_split("test")
    shape = bundled_info(name)["input_shape"]
    return x.reshape(len(x), *shape[1:]), y


@pytest.mark.parametrize("name", BUNDLED_MODELS)
def test_bundled_onnx_is_valid_with_named_dynamic_batch_io(name: str) -> None:
    model = onnx.load(str(bundled_model_path(name)))
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    (graph_input,) = model.graph.input
    (graph_output,) = model.graph.output
    assert (graph_input.name, graph_output.name) == ("input", "logits")
    assert graph_input.type.tensor_type.shape.dim[0].dim_param == "N"
    assert graph_output.type.tensor_type.shape.dim[0].dim_param == "N"

    session = _session(name)
    x, _ = _test_inputs(name)
    one = session.run(None, {"input": x[:1]})[0]
    many = session.run(None, {"input": x[:37]})[0]
    assert one.shape == (1, 10) and many.shape == (37, 10)
    np.testing.assert_allclose(one[0], many[0], atol=1e-5)


@pytest.mark.parametrize("name", BUNDLED_MODELS)
def test_recorded_accuracy_is_measured_accuracy_and_above_floor(name: str) -> None:
    recorded = bundled_info(name)["test_accuracy"]
    measured = evaluate_onnx_accuracy(bundled_model_path(name), "test")
    assert measured == pytest.approx(recorded, abs=1e-6)
    assert measured >= MIN_ACCURACY[name]
    # Trained, not memorised noise: calibration accuracy (unseen in training) is high too.
    assert evaluate_onnx_accuracy(bundled_model_path(name), "calib") >= MIN_ACCURACY[name] - 0.03


@pytest.mark.parametrize("name", BUNDLED_MODELS)
def test_models_json_records_provenance_and_parameter_count(name: str) -> None:
    info = bundled_info(name)
    model = onnx.load(str(bundled_model_path(name)))
    assert info["file"] == bundled_model_path(name).name
    assert (info["input"], info["output"]) == ("input", "logits")
    assert info["command"].startswith("python scripts/make_bundled_models.py")
    assert isinstance(info["seed"], int) and info["torch"]
    # Folding BatchNorm into the bias-free convs trades each BN's gamma+beta for one conv bias:
    # the CNN's ONNX holds 16+32+64 numbers fewer than its torch parameters; the others match.
    onnx_numbers = sum(int(np.prod(t.dims)) for t in model.graph.initializer if len(t.dims) >= 1)
    assert onnx_numbers == info["parameters"] - (112 if name == "digits_cnn" else 0)


def test_cnn_has_the_layers_tests_rely_on() -> None:
    """A 1-channel stem and a depthwise conv (both must stay dense) next to eligible convs."""
    model = onnx.load(str(bundled_model_path("digits_cnn")))
    weights = {t.name: t for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    groups = [next((a.i for a in n.attribute if a.name == "group"), 1) for n in convs]
    in_channels = [weights[n.input[1]].dims[1] for n in convs]
    assert groups == [1, 1, 1, 64, 1]
    assert in_channels == [1, 16, 32, 1, 64]
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["Gemm"] == 2 and ops["BatchNormalization"] == 0  # legacy exporter folds BN in eval mode


def test_vit_attention_is_plain_matmuls_with_constant_weights() -> None:
    model = onnx.load(str(bundled_model_path("digits_vit")))
    initializers = {t.name for t in model.graph.initializer}
    ops = Counter(n.op_type for n in model.graph.node)
    weight_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in initializers]
    # q, k, v, proj, fc1, fc2 in each of 2 blocks; 2 more activation×activation MatMuls per block.
    assert len(weight_matmuls) == 12
    assert ops["MatMul"] == 16 and ops["Softmax"] == 2 and "Attention" not in ops


def test_mlp_is_three_gemms_on_flat_input() -> None:
    model = onnx.load(str(bundled_model_path("digits_mlp")))
    assert [n.op_type for n in model.graph.node] == ["Gemm", "Relu", "Gemm", "Relu", "Gemm"]
    assert model.graph.input[0].type.tensor_type.shape.dim[1].dim_value == 64


def test_split_is_stratified_disjoint_and_scaled() -> None:
    splits = {s: load_digits_split(s) for s in ("train", "calib", "test")}
    sizes = {s: len(y) for s, (_, y) in splits.items()}
    assert sum(sizes.values()) == 1797 and sizes["train"] == 1078
    for x, y in splits.values():
        assert x.dtype == np.float32 and x.shape[1:] == (1, 8, 8) and y.dtype == np.int64
        assert 0.0 <= x.min() and x.max() <= 1.0
        # Stratified: every class holds its ~10 % share in every split.
        assert np.all(np.abs(np.bincount(y, minlength=10) / len(y) - 0.1) < 0.015)
    # No held-out image also appears in the training set (compared as exact byte rows).
    train_rows = {row.tobytes() for row in splits["train"][0].reshape(sizes["train"], -1)}
    test_rows = np.concatenate([splits[s][0] for s in ("calib", "test")]).reshape(-1, 64)
    assert not any(row.tobytes() in train_rows for row in test_rows)


def test_unknown_names_give_one_line_errors_listing_valid_ones() -> None:
    with pytest.raises(MpcompileError, match="digits_cnn, digits_vit, digits_mlp"):
        bundled_model_path("resnet50")
    with pytest.raises(MpcompileError, match="train, calib, test"):
        load_digits_split("validation")


def test_write_split_npz_shapes_images_for_the_model(tmp_path) -> None:
    path = write_split_npz("calib", tmp_path / "calib.npz", model="digits_mlp")
    with np.load(path) as data:
        assert data["input"].shape == (359, 64) and data["labels"].shape == (359,)
    with np.load(write_split_npz("calib", tmp_path / "img.npz")) as data:
        assert data["input"].shape == (359, 1, 8, 8)


def test_bundled_helpers_do_not_import_torch() -> None:
    code = (
        "import sys, mpcompile.zoo.bundled as b; "
        "b.evaluate_onnx_accuracy(b.bundled_model_path('digits_mlp')); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("name", BUNDLED_MODELS)
def test_torch_module_from_state_dict_matches_onnx(name: str) -> None:
    torch = pytest.importorskip("torch")
    from mpcompile.zoo.digits import load_bundled_module

    module = load_bundled_module(name)
    x, _ = _test_inputs(name)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    got = _session(name).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert bundled_weights_path(name).stat().st_size < 400_000


def test_bundled_data_stays_small() -> None:
    folder = bundled_model_path("digits_cnn").parent
    total = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    assert total < 2_000_000
    recorded = json.loads((folder / "models.json").read_text())["models"]
    assert sorted(recorded) == sorted(BUNDLED_MODELS)
