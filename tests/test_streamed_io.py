"""Low-memory model I/O: the streamed inline writer, the wire-level skeleton reader used by the
checker on big files, and loaded models that no longer pin the parsed protobuf."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from mpcompile.checks import checker
from mpcompile.errors import InvalidModelError
from mpcompile.io.model_io import load_model, save_model, write_inline_streamed
from mpcompile.io.proto_stream import load_skeleton
from mpcompile.zoo.bundled import bundled_model_path


@pytest.mark.parametrize("name", ["digits_cnn", "digits_vit"])
def test_streamed_writer_gives_the_same_model_as_ir_save(tmp_path, name):
    model = ir.load(bundled_model_path(name))
    ir.save(model, tmp_path / "reference.onnx")
    write_inline_streamed(model, tmp_path / "streamed.onnx")
    reference, streamed = onnx.load(tmp_path / "reference.onnx"), onnx.load(tmp_path / "streamed.onnx")
    onnx.checker.check_model(streamed, full_check=True)
    assert [t.name for t in streamed.graph.initializer] == [t.name for t in reference.graph.initializer]
    for a, b in zip(reference.graph.initializer, streamed.graph.initializer):
        assert a == b
    assert streamed.graph.node == reference.graph.node
    assert streamed.opset_import == reference.opset_import and streamed.metadata_props == reference.metadata_props
    # the model itself is left as it was: its initializers are back, in order
    ir.save(model, tmp_path / "again.onnx")
    assert onnx.load(tmp_path / "again.onnx") == reference


def test_onnxruntime_runs_a_streamed_file(tmp_path):
    import onnxruntime as ort

    model = ir.load(bundled_model_path("digits_mlp"))
    ir.save(model, tmp_path / "a.onnx")
    write_inline_streamed(model, tmp_path / "b.onnx")
    outs = []
    for name in ("a.onnx", "b.onnx"):
        session = ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
        inp = session.get_inputs()[0]
        shape = [d if isinstance(d, int) else 4 for d in inp.shape]
        x = np.random.default_rng(0).random(shape).astype(np.float32)
        outs.append(session.run(None, {inp.name: x})[0])
    np.testing.assert_array_equal(outs[0], outs[1])


def test_skeleton_reads_every_tensor_back_from_the_file(tmp_path):
    path = tmp_path / "m.onnx"
    write_inline_streamed(ir.load(bundled_model_path("digits_cnn")), path)
    full, skeleton = onnx.load(path), load_skeleton(path)
    assert len(skeleton.graph.initializer) == len(full.graph.initializer)
    for a, b in zip(full.graph.initializer, skeleton.graph.initializer):
        assert b.name == a.name and list(b.dims) == list(a.dims) and b.data_type == a.data_type
        if a.raw_data:
            assert b.data_location == onnx.TensorProto.EXTERNAL and not b.raw_data
        np.testing.assert_array_equal(numpy_helper.to_array(b, base_dir=str(tmp_path)), numpy_helper.to_array(a))
    assert skeleton.graph.node == full.graph.node


def test_checker_reports_the_same_either_way(tmp_path, monkeypatch):
    from mpcompile.pipeline import CompileOptions, compile_model

    out = compile_model(bundled_model_path("digits_vit"), CompileOptions(output=str(tmp_path / "s.onnx"))).output_path
    whole = checker.check_model(out).to_dict()
    monkeypatch.setattr(checker, "STREAM_LOAD_BYTES", 0)
    streamed = checker.check_model(out).to_dict()
    assert streamed == whole and any(layer["marked"] for layer in streamed["layers"])
    # and a violation is still caught through the streamed reader
    model = onnx.load(out)
    marked = next(n for n in model.graph.node if any(p.key == "mpcompile.sparsity" for p in n.metadata_props))
    weight = next(t for t in model.graph.initializer if t.name in marked.input)
    dense = numpy_helper.to_array(weight).copy()
    dense[dense == 0] = 1.0
    weight.CopyFrom(numpy_helper.from_array(dense, weight.name))
    onnx.save(model, tmp_path / "bad.onnx")
    assert not checker.check_model(tmp_path / "bad.onnx").ok


def test_skeleton_rejects_truncated_files(tmp_path):
    path = tmp_path / "m.onnx"
    write_inline_streamed(ir.load(bundled_model_path("digits_mlp")), path)
    data = path.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        load_skeleton(tmp_path / "cut.onnx")


def test_cli_check_names_a_truncated_big_file(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    write_inline_streamed(ir.load(bundled_model_path("digits_mlp")), path)
    data = path.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) - 100])
    monkeypatch.setattr(checker, "STREAM_LOAD_BYTES", 0)
    with pytest.raises(InvalidModelError, match="cut.onnx"):
        checker.check_model(tmp_path / "cut.onnx")


def test_loaded_model_does_not_pin_the_parsed_weights(tmp_path):
    loaded = load_model(bundled_model_path("digits_cnn"))
    value = next(v for v in loaded.model.graph.initializers.values() if v.const_value.size > 1024)
    assert type(value.const_value) is ir.Tensor  # its own array, not a view into the protobuf
    tracked = value.const_value.numpy()
    ref = weakref.ref(tracked.base if tracked.base is not None else tracked)
    value.const_value = ir.tensor(np.zeros(value.const_value.shape.numpy(), np.float32), name=value.name)
    del tracked
    gc.collect()
    assert ref() is None  # the replaced weight's memory is released
    # the kept proto is a data-free skeleton that still names every initializer
    big = [t for t in loaded.proto.graph.initializer if np.prod(t.dims) > 1024]
    assert big and all(not t.raw_data for t in big)
    out = save_model(loaded.model, tmp_path / "out.onnx")
    np.testing.assert_array_equal(numpy_helper.to_array(next(t for t in onnx.load(out).graph.initializer
                                                             if t.name == value.name)), 0.0)
