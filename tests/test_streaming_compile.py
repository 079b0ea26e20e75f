"""Streamed data-free compile: each masked weight goes to disk as it is written, the output is
the same bits as the in-memory path, the input is untouched and the output appears atomically."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from benchmarks.llama_generator import LlamaConfig, write_llama
import mpcompile.numerics.permutation  # noqa: F401  (imported by the permute stage: not in the measured peak)
import mpcompile.passes.permute_channels  # noqa: F401
from mpcompile.io.outputs import KILL_HOOK_ENV, RunOutputs
from mpcompile.io.spill import SpillFile
from mpcompile.pipeline import BACK_STAGES, FRONT_STAGES, LAYER_STAGES, compile_model
from mpcompile.stages import streaming
from mpcompile.stages.options import CompileOptions
from mpcompile.stages.state import CompileState, run_stages

# 8 decoder blocks of 128 wide: 57 GEMM weights, 3.3 MB of FP16 external data; the largest
# weight (the 344-wide FFN) is 88 KB, so "a few layers" and "the model" are far apart.
DEEP = LlamaConfig("deep", layers=8, dim=128, ffn=344, heads=4, vocab=256)
ONE = LlamaConfig("one", layers=1, dim=128, ffn=344, heads=4, vocab=256)  # for the slower whole-run tests
FAST = {"perm_steps": 0, "synthetic_samples": 4}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_llama(tmp_path_factory.mktemp("llama"), DEEP, seed=1)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return write_llama(tmp_path_factory.mktemp("llama1"), ONE, seed=2)


def _digest(paths: list[Path]) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _weights(path: Path) -> dict[str, np.ndarray]:
    proto = onnx.load(str(path), load_external_data=True)
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def _compile(model: Path, out: Path, **options):
    return compile_model(model, CompileOptions(output=str(out), keep_dense=False, **FAST, **options))


def test_streamed_output_is_bit_identical_and_input_untouched(small, tmp_path, monkeypatch):
    inputs = [small, small.with_name(small.name + ".data")]
    before = _digest(inputs)
    spilled: list[str] = []
    original = SpillFile.spill
    monkeypatch.setattr(SpillFile, "spill", lambda self, a, d, name: spilled.append(name) or original(self, a, d, name))
    streamed = _compile(small, tmp_path / "s.onnx")  # external input: streams by default
    masked = [m.layer for m in streamed.masks]
    assert len(masked) == 7 * ONE.layers + 1 and len(spilled) == len(masked)
    spilled_after_stream = len(spilled)
    plain = _compile(small, tmp_path / "p.onnx", stream=False)
    assert len(spilled) == spilled_after_stream  # stream=False never spills
    a, b = _weights(tmp_path / "s.onnx"), _weights(tmp_path / "p.onnx")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name
    # the same bits give the same content-addressed data file
    assert [Path(f.path).name[2:] for f in streamed.output_files] == [Path(f.path).name[2:] for f in plain.output_files]
    assert streamed.check_ok and plain.check_ok
    assert streamed.validation.to_dict() == plain.validation.to_dict()
    assert _digest(inputs) == before
    # the spectrum figures are those of the same masks
    assert streamed.spectra() == plain.spectra()
    # nothing but the model and its data is left in the folder: the spill went with the staging
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("s.")) == sorted(
        Path(f.path).name for f in streamed.output_files)


def _state(model: Path, out: Path, files: RunOutputs, **options) -> CompileState:
    opts = CompileOptions(output=str(out), keep_dense=False, **FAST, **options)
    return CompileState(model, opts, files)


def _resident(state: CompileState) -> tuple[int, int]:
    """(bytes of weights held as in-memory arrays, number of memory-mapped tensors still mapped)."""
    held = mapped = 0
    for value in state.model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            mapped += tensor.raw is not None
        elif tensor is not None and tensor.nbytes >= 4096:
            held += tensor.nbytes
    return held, mapped


@pytest.mark.parametrize("stream", [True, False])
def test_mask_and_write_hold_a_few_layers_not_the_model(model, tmp_path, stream):
    """tracemalloc over the mask and write stages: streamed, the peak of Python-side (numpy)
    memory is a few of the largest layers and nothing stays resident; in memory, the masked
    model stays (the control: the measurement can see the difference)."""
    largest = 4 * DEEP.dim * DEEP.ffn  # the largest GEMM as the float32 [out, K] the masks work on
    gemm_bytes = 2 * (4 * DEEP.dim * DEEP.dim + 3 * DEEP.dim * DEEP.ffn) * DEEP.layers
    with RunOutputs([model]) as files:
        state = _state(model, tmp_path / "m.onnx", files, stream=stream)
        run_stages(FRONT_STAGES, state)
        tracemalloc.start()
        try:
            run_stages(LAYER_STAGES, state)
            held, mapped = _resident(state)
            after_mask = tracemalloc.get_traced_memory()[0]
            run_stages(BACK_STAGES[:5], state)  # drift order/budget, lower, spectra, write
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        spill = state.spill
        if stream:
            assert spill is not None and spill.tensors == 7 * DEEP.layers + 1
            assert spill.nbytes >= gemm_bytes  # every masked GEMM weight is on disk
            assert held == 0 and mapped == 0  # no masked weight in memory, none left mapped
            assert after_mask < 2 * largest
            # one layer's working set: its float32 dense and masked matrices, the mask, the FP16
            # copy written, and the float64 copies the spectrum figures take (~9× measured)
            assert peak < 12 * largest < gemm_bytes
        else:
            assert spill is None
            assert held >= gemm_bytes
            assert after_mask > gemm_bytes
        run_stages(BACK_STAGES[5:], state)  # check, validate
        assert state.check.ok and state.validation is not None
        if stream:  # the model reads it until the run ends (the HTML report plots weights)
            assert spill.path.exists()
    if stream:
        assert not spill.path.exists()  # gone with the staging folder


def test_end_to_end_validation_skipped_above_the_memory_share(small, tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "END_TO_END_RAM_SHARE", 1e-9)
    result = _compile(small, tmp_path / "v.onnx")
    assert result.validation is None and result.check_ok and result.committed
    note = next(n for n in result.notes if n.startswith("end-to-end ONNX Runtime validation skipped"))
    assert "GB of weights" in note and "2:4 check" in note
    # a calibrated method runs the model anyway: validation is not skipped for it
    result = _compile(small, tmp_path / "w.onnx", method="wanda")
    assert result.validation is not None


def _killed_compile(model: Path, out: Path) -> None:
    os.environ[KILL_HOOK_ENV] = "model-staged"  # in the forked child only
    _compile(model, out)


def test_killed_streamed_compile_leaves_no_output_and_is_cleaned_up(small, tmp_path, capfd):
    """SIGKILLed once the model is staged (spill and output data on disk): no final name
    appears, the input is untouched, and the next run into the folder removes the leftovers."""
    out = tmp_path / "k.onnx"
    inputs = [small, small.with_name(small.name + ".data")]
    before = _digest(inputs)
    child = multiprocessing.get_context("fork").Process(target=_killed_compile, args=(small, out))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []
    staging = [p for p in tmp_path.iterdir() if p.name.startswith(".mpcompile-")]
    assert len(staging) == 1 and any(p.suffix == ".spill" for p in staging[0].iterdir())
    result = _compile(small, out)
    assert result.committed and out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mpcompile-")]
    assert "killed mpcompile run" in capfd.readouterr().err
    assert _digest(inputs) == before


def test_sketched_spectrum_change_matches_exact_on_a_wide_layer(monkeypatch):
    """--spectrum sketch: the figures by randomized top-k, against the full solve (the size
    rule lowered from 2048 so the test stays fast)."""
    from mpcompile.numerics import sketch_spectrum
    from mpcompile.numerics.masks import apply_method
    from mpcompile.numerics.spectrum_change import spectrum_change

    monkeypatch.setattr(sketch_spectrum, "SKETCH_MIN_SIDE", 512)
    rng = np.random.default_rng(0)
    rows, cols, rank = 768, 1024, 8
    u, _ = np.linalg.qr(rng.standard_normal((rows, rank)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, rank)))
    w = (rng.standard_normal((rows, cols)) * 0.02 + (u * np.linspace(12, 6, rank)) @ v.T).astype(np.float32)
    sparse = np.asarray(apply_method("magnitude", w, None).weight, dtype=np.float32)
    exact = spectrum_change(w, sparse)
    sketch = spectrum_change(w, sparse, sketch=True)
    assert sketch.pop("spectrum") == "sketch" and "spectrum" not in exact
    assert sketch["relative_frobenius_error"] == exact["relative_frobenius_error"]
    assert sketch["top_k_within_5pct"] == exact["top_k_within_5pct"]
    assert sketch["relative_spectral_error"] == pytest.approx(exact["relative_spectral_error"], rel=0.05)
    assert spectrum_change(w[:256], sparse[:256], sketch=True).get("spectrum") is None  # small: exact


def test_magnitude_mask_by_row_blocks_is_the_same_bits(monkeypatch):
    """The mask is computed a block of rows at a time (memory of one block, not the layer):
    the same bits as one argsort over the whole matrix, ties included."""
    from mpcompile.numerics import masks

    rng = np.random.default_rng(3)
    w = rng.standard_normal((37, 64)).astype(np.float32)
    w[::3, ::5] = 0.5  # ties inside groups
    whole = masks._topn_mask(np.abs(w.astype(np.float64)), 2, 4)
    a = np.abs(w.astype(np.float64))
    kept = float(a[whole].sum()) / float(a.sum())
    monkeypatch.setattr(masks, "_MASK_BLOCK_ENTRIES", 64 * 5)  # 5 rows a block, the last one partial
    result = masks.magnitude_24(w)
    assert np.array_equal(result.mask, whole)
    assert result.kept_magnitude_fraction == pytest.approx(kept, rel=1e-12)
