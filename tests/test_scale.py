"""Models bigger than the machine: lazy weights, the two-stage eigensolver, the sketch, Ray fan-out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from benchmarks.llama_generator import LlamaConfig, write_llama
from mpcompile.analyze import AnalyzeOptions, analyze_model
from mpcompile.numerics.mp_law import fit_mp, symmetric_eigenvalues
from mpcompile.numerics.sketch_spectrum import fit_mp_sketch, top_singular_values

SMALL = LlamaConfig("small", layers=1, dim=128, ffn=344, heads=4, vocab=256)


def _planted(rows: int, cols: int, rank: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)) * 0.02
    edge = 0.02 * (np.sqrt(rows) + np.sqrt(cols))
    u, _ = np.linalg.qr(rng.standard_normal((rows, rank)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, rank)))
    return (w + (u * edge * np.linspace(4, 2, rank)) @ v.T).astype(np.float32)


def test_two_stage_eigenvalues_equal_eigvalsh():
    x = np.random.default_rng(0).standard_normal((600, 700))
    gram = x @ x.T
    expected = np.linalg.eigvalsh(gram)
    got = symmetric_eigenvalues(gram.copy())
    assert np.max(np.abs(got - expected)) <= 1e-12 * expected[-1]


def test_sketch_finds_planted_spikes_and_sigma2():
    w = _planted(768, 1536, rank=12)
    exact = fit_mp(w)
    sketch = fit_mp_sketch(w, sample_rows=256, min_side=0)
    assert sketch.spectrum == "sketch" and exact.spectrum == "exact"
    assert abs(sketch.sigma2 / exact.sigma2 - 1) < 0.02
    assert sketch.spikes == exact.spikes == 12
    assert sketch.bulk_fraction == pytest.approx(exact.bulk_fraction)
    assert sketch.spectral_norm == pytest.approx(exact.spectral_norm, rel=1e-5)
    assert sketch.top_singular_values == pytest.approx(exact.top_singular_values, rel=1e-4)
    assert sketch.frobenius_norm == pytest.approx(exact.frobenius_norm, rel=1e-6)


def test_top_singular_values_match_svd():
    w = _planted(300, 500, rank=5, seed=3)
    s = np.linalg.svd(w, compute_uv=False)
    assert top_singular_values(w, 5) == pytest.approx(s[:5], rel=1e-5)


def test_sketch_falls_back_to_exact_on_small_matrices():
    w = _planted(200, 400, rank=3)
    assert fit_mp_sketch(w) == fit_mp(w)


def test_analyze_unmaps_every_external_weight(tmp_path):
    path = write_llama(tmp_path, SMALL)
    analysis = analyze_model(path)
    tensors = [v.const_value for v in analysis.loaded.model.graph.initializers.values()
               if isinstance(v.const_value, ir.ExternalTensor)]
    assert len(tensors) >= 8
    assert all(t.raw is None for t in tensors), "a weight stayed memory-mapped after the analysis"
    assert sum(a.fit.spikes == 16 for a in analysis.result.layers if a.fit) == 8  # 7 per block + the LM head, each planted rank 16


_PEAK = r"""
import json, resource, sys
from mpcompile.analyze import analyze_model
analyze_model(sys.argv[1])
print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _peak_rss(path: Path) -> int:
    out = subprocess.run([sys.executable, "-c", _PEAK, str(path)], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])["maxrss_kb"] * 1024


@pytest.mark.slow
def test_analyze_peak_rss_does_not_grow_with_the_model(tmp_path):
    """16 blocks of 384-wide FP16 weights (57 MB) against one block: the peak grows by far
    less than the weights (it held every mapped page before weights were unmapped per layer)."""
    one = write_llama(tmp_path / "one", LlamaConfig("one", layers=1, dim=384, ffn=1024, heads=8, vocab=256))
    big_config = LlamaConfig("big", layers=16, dim=384, ffn=1024, heads=8, vocab=256)
    big = write_llama(tmp_path / "big", big_config)
    growth = _peak_rss(big) - _peak_rss(one)
    assert growth < 0.35 * big_config.weight_bytes, f"peak RSS grew {growth / 1e6:.0f} MB"


def test_compile_of_external_data_model_from_another_folder(tmp_path, monkeypatch):
    """Small initializers kept in the session graph as external data used to reach ONNX
    Runtime as paths relative to the working directory (refused: 'escapes working directory')."""
    from mpcompile.pipeline import CompileOptions, compile_model

    path = write_llama(tmp_path / "model", SMALL)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = compile_model(path, CompileOptions(output=str(tmp_path / "model" / "small.sparse.onnx"),
                                                permute=False))
    assert result.check_ok and result.committed
    assert len(result.masks) == 8  # every MatMul weight, the LM head included


def _fits(analysis) -> list[dict]:
    return [a.to_dict() for a in analysis.result.layers]


def test_ray_fanout_gives_the_single_process_results(tmp_path):
    ray = pytest.importorskip("ray", reason="ray not installed (pip install 'mpcompile[ray]')")
    path = write_llama(tmp_path, SMALL)
    local = _fits(analyze_model(path))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        fanned = _fits(analyze_model(path, options=AnalyzeOptions(workers="ray")))
        sketched_local = _fits(analyze_model(path, options=AnalyzeOptions(spectrum="sketch")))
        sketched_ray = _fits(analyze_model(path, options=AnalyzeOptions(spectrum="sketch", workers="ray")))
    finally:
        ray.shutdown()
    assert fanned == local
    assert sketched_ray == sketched_local
    assert len(local) == 8 and all(layer["mp"] is not None for layer in local)


def test_workers_ray_without_ray_is_a_one_line_exit_5(tmp_path, monkeypatch):
    import builtins

    from mpcompile.cli import main

    path = write_llama(tmp_path, SMALL)
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    assert main(["analyze", str(path), "--workers", "ray", "--json"]) == 5
