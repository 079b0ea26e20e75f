"""The synthetic benchmark models are real models: valid ONNX, runnable, with the GEMMs we claim.

The benchmarks' figures (DESIGN §5) are only meaningful if the generated graphs are what
their docstrings say, so the generators are checked here at small sizes (same code paths as
ViT-B/16 and ResNet-50, only the dimensions shrink).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

# `benchmarks/` is not an installed package; plain `pytest` (unlike `python -m pytest` from the
# repository root) does not put the root on sys.path.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks.model_generators import ResNetConfig, ViTConfig, write_resnet, write_vit  # noqa: E402
from mpcompile.io.model_io import load_model  # noqa: E402
from mpcompile.numerics.mp_law import fit_mp  # noqa: E402
from mpcompile.passes.gemm_discovery import discover_gemms  # noqa: E402

TINY_VIT = ViTConfig(dim=64, depth=2, heads=4, mlp=256, image=32, patch=8, classes=48)
TINY_RESNET = ResNetConfig(blocks=(3, 4, 6, 3), width=8, image=32, classes=10)


def _run(path, config, batch: int) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(1).standard_normal(
        (batch, config.channels, config.image, config.image)).astype(np.float32)
    return session.run(None, {"pixels": pixels})[0]


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    path = tmp_path_factory.mktemp("vit") / "vit.onnx"
    return write_vit(path, TINY_VIT, seed=3, planted_rank=2)


def test_vit_passes_checker_and_runs(tiny_vit):
    onnx.checker.check_model(str(tiny_vit.path), full_check=True)
    logits = _run(tiny_vit.path, TINY_VIT, batch=2)
    assert logits.shape == (2, TINY_VIT.classes)
    assert np.isfinite(logits).all()
    # Different images give different logits (the graph is not constant in its input).
    assert np.abs(logits[0] - logits[1]).max() > 1e-3


def test_vit_gemm_layers_match_the_architecture(tiny_vit):
    layers = discover_gemms(load_model(tiny_vit.path).model)
    assert len(layers) == TINY_VIT.gemm_layers == 1 + 6 * TINY_VIT.depth + 1
    assert [layer.weight_key for layer in layers] == tiny_vit.weight_names
    ops = [layer.op_type for layer in layers]
    assert ops[0] == "Conv" and set(ops[1:]) == {"MatMul"}
    shapes = {(layer.out_features, layer.reduction) for layer in layers}
    d, m, c = TINY_VIT.dim, TINY_VIT.mlp, TINY_VIT.classes
    assert shapes == {(d, 3 * 8 * 8), (d, d), (m, d), (d, m), (c, d)}
    # The attention score/context MatMuls have no constant weight and must not be listed.
    assert not any("qk_MatMul" in layer.name or "av_MatMul" in layer.name for layer in layers)
    # Only the RGB patch embedding (Cin = 3) is ineligible for 2:4.
    assert [layer.name for layer in layers if not layer.eligible] == ["patch_embed/Conv"]


def test_vit_parameter_count_matches_formula(tiny_vit):
    c = TINY_VIT
    per_block = 4 * (c.dim * c.dim + c.dim) + 2 * c.dim * c.mlp + c.mlp + c.dim + 4 * c.dim
    expected = (c.dim * c.channels * c.patch**2 + c.dim + c.dim + c.tokens * c.dim
                + c.depth * per_block + 2 * c.dim + c.dim * c.classes + c.classes)
    assert tiny_vit.parameters == expected
    # ViT-B/16 shape, from the same formula: ~86.6 M parameters (~346 MB fp32).
    b = ViTConfig()
    per_block = 4 * (b.dim * b.dim + b.dim) + 2 * b.dim * b.mlp + b.mlp + b.dim + 4 * b.dim
    total = (b.dim * b.channels * b.patch**2 + 2 * b.dim + b.tokens * b.dim + b.depth * per_block
             + 2 * b.dim + b.dim * b.classes + b.classes)
    assert 86e6 < total < 87e6 and b.gemm_layers == 74


def test_vit_weights_carry_exactly_the_planted_spikes(tiny_vit):
    """Every GEMM weight is noise at std 0.02 plus `planted_rank` spikes above the MP edge.

    σ² tolerance 20 %: at p = 48–64 the planted directions shift the BEMA window by ~rank/p
    and the window holds only ~30 eigenvalues (observed spread over 8 seeds: −3 % … +10 %);
    a wrong weight scale (e.g. std 0.01 or 0.04) is off by 4×.
    """
    for layer in discover_gemms(load_model(tiny_vit.path).model):
        fit = fit_mp(layer.matrix())
        assert fit.spikes == tiny_vit.planted_rank, layer.name
        assert fit.sigma2 == pytest.approx(0.02**2, rel=0.2), layer.name


def test_resnet_passes_checker_runs_and_has_54_gemm_layers(tmp_path):
    model = write_resnet(tmp_path / "resnet.onnx", TINY_RESNET, seed=0)
    onnx.checker.check_model(str(model.path), full_check=True)
    logits = _run(model.path, TINY_RESNET, batch=1)
    assert logits.shape == (1, TINY_RESNET.classes) and np.isfinite(logits).all()
    layers = discover_gemms(load_model(model.path).model)
    assert len(layers) == model.gemm_layers == 54
    assert sum(layer.op_type == "Conv" for layer in layers) == 53
    fc = layers[-1]
    assert fc.op_type == "Gemm" and (fc.out_features, fc.reduction) == (10, 8 * 8 * 4)
    # Strided 3×3 convs and projections downsample 4 times after the stem + max-pool.
    strided = [layer.name for layer in layers
               if layer.op_type == "Conv" and layer.node.attributes.get_ints("strides", [1, 1])[0] == 2]
    assert strided == ["conv1/Conv"] + [f"layer{s}.0.{c}/Conv" for s in (2, 3, 4)
                                        for c in ("conv2", "downsample")]
