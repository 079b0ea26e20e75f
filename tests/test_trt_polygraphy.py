"""What ``mpcompile build`` asks TensorRT for, read off the Polygraphy loaders without TensorRT.

Polygraphy imports TensorRT only when a loader is *called*, so :func:`plan_build` can be run
here and its loaders' attributes (the ONNX path, strong typing, ``sparse_weights``, precision
flags, the optimisation profile, the timing cache) are exactly what Polygraphy will hand to
``IBuilderConfig``. The log capture is tested with Polygraphy's real logger, fed the way its
TensorRT logger feeds it. The build itself needs TensorRT and a GPU (``test_trt_parsing.py``,
marked ``gpu``).
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("polygraphy")
from polygraphy.backend import trt as poly  # noqa: E402
from polygraphy.logger import G_LOGGER  # noqa: E402

from mpcompile.errors import BackendUnavailableError, OptionalDependencyError, UsageError  # noqa: E402
from mpcompile.trt.build_plan import BuildConfig, TrtCaps, import_polygraphy_trt, plan_build  # noqa: E402
from mpcompile.trt.builder import capture_polygraphy_log  # noqa: E402
from mpcompile.trt.log_parse import parse_build_log  # noqa: E402

TRT10 = TrtCaps("10.3.0", strongly_typed_flag=True, fp16_flag=True, tf32_flag=True)
TRT11 = TrtCaps("11.0.0", strongly_typed_flag=False, fp16_flag=False, tf32_flag=True)
TRT86 = TrtCaps("8.6.1", strongly_typed_flag=False, fp16_flag=True, tf32_flag=True)


def _two_matmul(path: Path, dtype=np.float32, batch: int | str = 4, init_as_input: bool = False) -> Path:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(dtype), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(dtype), "w2")
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("x", elem, [batch, 64])]
    if init_as_input:  # old exporters list initializers as graph inputs too
        inputs.append(helper.make_tensor_value_info("w1", elem, [64, 64]))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="/fc1/MatMul"),
         helper.make_node("Relu", ["h"], ["r"], name="/act/Relu"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="/fc2/MatMul")],
        "g", inputs, [helper.make_tensor_value_info("y", elem, [batch, 32])], [w1, w2])
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_fp32_model_on_trt10_asks_for_sparse_fp16_tf32_and_the_timing_cache(tmp_path):
    model = _two_matmul(tmp_path / "m.onnx")
    cache = tmp_path / "timing.cache"
    plan = plan_build(model, BuildConfig(sparse=True, fp16=True, timing_cache=cache), TRT10)
    assert isinstance(plan.network, poly.NetworkFromOnnxPath)
    assert plan.network.path == str(model) and plan.network.strongly_typed is False
    config = plan.config
    assert isinstance(config, poly.CreateConfig)
    assert config.sparse_weights is True and config.fp16 is True and config.tf32 is True
    assert config.int8 is False and config.bf16 is False
    assert config.timing_cache_path == str(cache)
    # None = Polygraphy's default, ProfilingVerbosity.DETAILED: the inspector needs tactics
    assert config.profiling_verbosity is None
    assert plan.strongly_typed is False and plan.fp16_flag is True and plan.notes == []

    dense = plan_build(model, BuildConfig(sparse=False), TRT10).config
    assert dense.sparse_weights is False and dense.fp16 is True and dense.timing_cache_path is None


def test_strong_typing_follows_the_weights_and_the_tensorrt_version(tmp_path):
    fp16 = _two_matmul(tmp_path / "h.onnx", dtype=np.float16)
    plan = plan_build(fp16, BuildConfig(), TRT10)
    assert plan.strongly_typed and plan.network.strongly_typed is True
    assert plan.config.fp16 is False and plan.fp16_flag is False and plan.notes == []

    fp32 = _two_matmul(tmp_path / "f.onnx")
    plan = plan_build(fp32, BuildConfig(sparse=True), TRT11)
    # TensorRT 11: strongly typed with no flag to set (Polygraphy would fail on a missing flag)
    assert plan.strongly_typed and plan.network.strongly_typed is False
    assert plan.config.fp16 is False and plan.config.sparse_weights is True
    assert len(plan.notes) == 1 and "no FP32 sparse kernels" in plan.notes[0]
    assert plan_build(fp32, BuildConfig(sparse=False), TRT11).notes == []

    forced = plan_build(fp32, BuildConfig(strongly_typed=False), TRT10)
    assert not forced.strongly_typed and forced.config.fp16 is True
    with pytest.raises(BackendUnavailableError, match="no strongly typed networks"):
        plan_build(fp32, BuildConfig(strongly_typed=True), TRT86)
    old = plan_build(fp16, BuildConfig(), TRT86)  # no flag on 8.6: weakly typed, FP16 flag
    assert not old.strongly_typed and old.config.fp16 is True


def test_one_profile_from_the_shape_specs_and_dynamic_inputs_refused_without(tmp_path):
    dynamic = _two_matmul(tmp_path / "d.onnx", batch="batch", init_as_input=True)
    with pytest.raises(UsageError, match=r"x\[-1, 64\] need --profile"):
        plan_build(dynamic, BuildConfig(), TRT10)  # Polygraphy alone would build batch=1
    plan = plan_build(dynamic, BuildConfig(profiles=["x:1x64,8x64,32x64"]), TRT10)
    (profile,) = plan.config.profiles
    assert isinstance(profile, poly.Profile) and list(profile) == ["x"]
    assert (profile["x"].min, profile["x"].opt, profile["x"].max) == ((1, 64), (8, 64), (32, 64))
    with pytest.raises(UsageError, match="unknown input"):
        plan_build(dynamic, BuildConfig(profiles=["x:1x64", "nope:1x64"]), TRT10)
    static = plan_build(_two_matmul(tmp_path / "s.onnx"), BuildConfig(), TRT10)
    assert [dict(p) for p in static.config.profiles] == [{}]  # nothing dynamic: nothing to fill


def test_workspace_limit_wraps_the_config(tmp_path):
    plan = plan_build(_two_matmul(tmp_path / "m.onnx"), BuildConfig(workspace_bytes=1 << 30), TRT10)
    assert isinstance(plan.config, poly.PostprocessConfig)
    assert plan.config._config.sparse_weights is True


def test_polygraphy_feeds_tensorrt_info_at_verbose():
    """The capture's floor (VERBOSE) rests on this mapping in Polygraphy's TensorRT logger."""
    from polygraphy.backend.trt import util as trt_util

    source = inspect.getsource(trt_util.get_trt_logger)
    assert "trt.Logger.INFO: G_LOGGER.verbose" in source
    assert "trt.Logger.ERROR: G_LOGGER.error" in source


def test_capture_keeps_sparsity_lines_off_stdout_and_restores_the_logger(capsys):
    before = (G_LOGGER.module_severity.get(), G_LOGGER.colors)
    with capture_polygraphy_log() as lines:
        G_LOGGER.verbose("(Sparsity) Layers eligible for sparse math: /fc1/MatMul, PWN(/a, /b)")
        G_LOGGER.verbose("(Sparsity) TRT inference plan picked sparse implementation for layers: /fc1/MatMul")
        G_LOGGER.extra_verbose("Tactic timing (TensorRT VERBOSE, dropped by default)")
        G_LOGGER.error("In node 3 (parseGraph): UNSUPPORTED_NODE: No importer registered for op: Odd")
    out = capsys.readouterr()
    assert out.out == ""  # Polygraphy prints to stdout otherwise, where our report goes
    assert len(lines) == 3 and lines[0].startswith("[V] (Sparsity)") and lines[2].startswith("[E] In node 3")
    log = parse_build_log("\n".join(lines))
    assert log.eligible_layers == ["/fc1/MatMul", "PWN(/a, /b)"]
    assert log.picked_sparse_layers == ["/fc1/MatMul"]
    assert len(log.errors) == 1 and "No importer registered" in log.errors[0]
    assert (G_LOGGER.module_severity.get(), G_LOGGER.colors) == before
    with capture_polygraphy_log(verbose=True) as verbose_lines:
        G_LOGGER.extra_verbose("Tactic timing")
    assert verbose_lines == ["[X] Tactic timing"]


def test_build_without_polygraphy_is_exit_5_in_one_line(tmp_path, monkeypatch, capsys):
    from mpcompile.cli import main
    from mpcompile.trt import gpu_probe

    model = _two_matmul(tmp_path / "m.onnx")
    monkeypatch.setattr(gpu_probe, "gpu_available", lambda require_tensorrt=True: (True, "a pretend A100"))
    monkeypatch.setitem(sys.modules, "polygraphy.backend", None)  # as if not installed
    with pytest.raises(OptionalDependencyError):
        import_polygraphy_trt()
    out = tmp_path / "m.build.json"
    assert main(["-q", "build", str(model), "-o", str(out)]) == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mpcompile: error: building TensorRT engines needs the optional package 'polygraphy': "
                   "pip install 'mpcompile[gpu]'"]
    assert not out.exists()


def test_polygraphy_failures_become_one_line_errors_with_tensorrt_lines(tmp_path, monkeypatch):
    """Parser and build failures reach us as PolygraphyException after TensorRT's [E] records:
    both become one-line errors quoting those records, and the log is still written."""
    from types import SimpleNamespace

    from mpcompile.errors import MpcompileError, UnsupportedModelError
    from mpcompile.trt import builder

    flags = SimpleNamespace(FP16=1, TF32=2)
    fake_trt = SimpleNamespace(__version__="10.3.0", BuilderFlag=flags,
                               NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=5))
    monkeypatch.setattr(builder, "import_tensorrt", lambda: fake_trt)
    model = _two_matmul(tmp_path / "m.onnx")

    def rejecting_parser():  # what polygraphy's check_onnx_parser_errors does
        G_LOGGER.error("In node 0 (parseGraph): UNSUPPORTED_NODE: No importer registered for op: Odd")
        G_LOGGER.critical("Could not parse ONNX correctly")

    def plan(network, config):
        return lambda *_: builder.BuildPlan(network, config, False, True)

    monkeypatch.setattr(builder, "plan_build", plan(rejecting_parser, None))
    with pytest.raises(UnsupportedModelError) as info:
        builder.build_engine(model, BuildConfig(), tmp_path / "m.engine")
    message = str(info.value)
    assert "\n" not in message and "rejected m.onnx" in message and "No importer registered for op: Odd" in message
    assert "UNSUPPORTED_NODE" in (tmp_path / "m.engine.log").read_text()
    assert not (tmp_path / "m.engine").exists()

    def failing_config(builder_, network):  # EngineBytesFromNetwork calls the config loader
        G_LOGGER.error("[optimizer.cpp::computeCosts] Error Code 10: Internal Error (no implementation)")
        G_LOGGER.critical("Invalid Engine. Please ensure the engine was built correctly")

    monkeypatch.setattr(builder, "plan_build", plan(lambda: ("builder", "network", "parser"), failing_config))
    with pytest.raises(MpcompileError) as info:
        builder.build_engine(model, BuildConfig(), tmp_path / "m.engine")
    message = str(info.value)
    assert message.startswith("TensorRT build failed: ") and "Error Code 10" in message and "\n" not in message
    assert not (tmp_path / "m.engine").exists()


def test_bad_profile_is_a_usage_error_even_without_a_gpu(tmp_path, capsys):
    from mpcompile.cli import main

    model = _two_matmul(tmp_path / "m.onnx")
    assert main(["-q", "build", str(model), "--profile", "x:8x64,4x64,16x64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mpcompile: error: --profile 'x:8x64,4x64,16x64': need min <= opt <= max in every dimension"]
    assert not (tmp_path / "m.build.json").exists()
