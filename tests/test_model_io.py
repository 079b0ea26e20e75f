"""Bad input gets one line naming the problem and a non-zero exit; inputs are never modified."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mpcompile.cli import main
from mpcompile.errors import EXIT_BAD_INPUT, EXIT_UNSUPPORTED, ExternalDataError, InvalidModelError, UsageError
from mpcompile.io.model_io import load_model, save_model


def _mlp(tmp_path, name="m.onnx", external=False, weight_dtype=np.float32):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(64, 32)).astype(weight_dtype), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])], initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / name
    onnx.save(model, path, save_as_external_data=external, location=name + ".data", size_threshold=0)
    return path


def _set_location(path, location):
    model = onnx.load(path, load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save(model, path)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_loads_external_data(tmp_path):
    path = _mlp(tmp_path, external=True)
    loaded = load_model(path)
    w = loaded.model.graph.initializers["w"].const_value.numpy()
    assert w.shape == (64, 32)


@pytest.mark.parametrize(
    "make, error, fragment",
    [
        (lambda p: _write(p / "x.onnx", b"this is not onnx \x00\xff" * 10),
         InvalidModelError, "not a valid ONNX file"),
        (lambda p: p / "missing.onnx", InvalidModelError, "no such file"),
        (lambda p: _write(p / "empty.onnx", b""), InvalidModelError, "empty"),
    ],
    ids=["garbage", "missing", "empty"],
)
def test_bad_files(tmp_path, make, error, fragment):
    with pytest.raises(error, match=fragment):
        load_model(make(tmp_path))


def test_truncated_file(tmp_path):
    path = _mlp(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidModelError):
        load_model(path)


def test_missing_external_data(tmp_path):
    path = _mlp(tmp_path, external=True)
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(ExternalDataError, match="not found"):
        load_model(path)


def test_truncated_external_data(tmp_path):
    path = _mlp(tmp_path, external=True)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ExternalDataError, match="truncated"):
        load_model(path)


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../x.bin"])
def test_external_data_escaping_the_folder_is_refused(tmp_path, location):
    folder = tmp_path / "model"
    folder.mkdir()
    path = _mlp(folder, external=True)
    (tmp_path / "secret.bin").write_bytes(b"\0" * 10000)
    _set_location(path, location)
    with pytest.raises(ExternalDataError, match="absolute path|escapes"):
        load_model(path)


def test_save_is_atomic_and_never_overwrites_input(tmp_path):
    path = _mlp(tmp_path)
    before = _digest(path)
    loaded = load_model(path)
    with pytest.raises(UsageError, match="is the input file"):
        save_model(loaded.model, path, protect=(path,))
    out = save_model(loaded.model, tmp_path / "out.onnx", protect=(path,))
    assert _digest(path) == before
    assert onnx.load(out).graph.node[0].op_type == "MatMul"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mpcompile-")]


def test_save_with_external_data(tmp_path):
    path = _mlp(tmp_path, external=True)
    loaded = load_model(path)
    out = save_model(loaded.model, tmp_path / "copy.onnx", external_data=True)
    data = [p.name for p in tmp_path.glob("copy.onnx.*.data")]
    assert len(data) == 1 and [e.value for e in onnx.load(out, load_external_data=False).graph.initializer[0]
                               .external_data if e.key == "location"] == data
    np.testing.assert_array_equal(
        numpy_helper.to_array(onnx.load(out).graph.initializer[0]),
        loaded.model.graph.initializers["w"].const_value.numpy(),
    )


def _no_gemm(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _string_weight(tmp_path):
    w = helper.make_tensor("w", TensorProto.STRING, [4, 4], [b"a"] * 16)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.STRING, [4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.STRING, [4, 4])], initializer=[w],
    )
    path = tmp_path / "str.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path, )
    return path


@pytest.mark.parametrize(
    "make, code, fragment",
    [
        (lambda p: _write(p / "x.onnx", b"hello"), EXIT_BAD_INPUT, "not a valid ONNX"),
        (lambda p: p / "nope.onnx", EXIT_BAD_INPUT, "no such file"),
        (_no_gemm, EXIT_UNSUPPORTED, "no MatMul/Gemm"),
        (_string_weight, EXIT_UNSUPPORTED, "unsupported dtype STRING"),
    ],
    ids=["not-onnx", "missing", "no-gemm", "string-dtype"],
)
def test_cli_bad_input_one_line(tmp_path, capsys, make, code, fragment):
    path = make(tmp_path)
    assert main(["analyze", str(path)]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mpcompile: error:") and fragment in err[0]


def test_cli_traversal_in_subprocess_no_traceback(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    path = _mlp(folder, external=True)
    _set_location(path, "../../outside.bin")
    before = _digest(path)
    proc = subprocess.run([sys.executable, "-m", "mpcompile", "analyze", str(path)], capture_output=True, text=True)
    assert proc.returncode == EXIT_BAD_INPUT
    assert "Traceback" not in proc.stderr
    assert "escapes the model's folder" in proc.stderr
    assert _digest(path) == before
