"""Pruning limit: the data-free magnitude bound, and SLQ against a dense Hessian on a tiny MLP."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mpcompile.errors import UsageError
from mpcompile.numerics.pruning_limit import layer_bounds, magnitude_bound, ratio_within_energy


def test_bound_matches_hand_computed_value():
    w = np.array([0.1, -0.3, 0.2, 1.0, -0.05])
    # ascending squares: 0.0025, 0.01, 0.04, 0.09, 1.0 → cumulative 0.0025, 0.0125, 0.0525, 0.1425, 1.1425
    # budget 2ε/κ = 2·0.03/1 = 0.06 → the 3 smallest fit (0.0525 ≤ 0.06 < 0.1425): ρ = 3/5
    bound = magnitude_bound(w, tolerance=0.03, sharpness=1.0)
    assert bound.ratio == pytest.approx(0.6)
    assert bound.energy_budget == pytest.approx(0.06)
    assert bound.total_energy == pytest.approx(1.1425)
    # doubling the curvature halves the budget (0.03): only 2 fit
    assert magnitude_bound(w, tolerance=0.03, sharpness=2.0).ratio == pytest.approx(0.4)
    assert ratio_within_energy(w, 0.0) == 0.0
    assert ratio_within_energy(w, 10.0) == 1.0


def test_bound_is_monotone_in_tolerance():
    w = np.random.default_rng(0).standard_normal(5000) * 0.05
    ratios = [magnitude_bound(w, tolerance=t).ratio for t in np.linspace(0.0, 5.0, 40)]
    assert all(b >= a for a, b in itertools.pairwise(ratios))
    assert ratios[0] == 0.0 and ratios[-1] > 0.9


def test_layer_bounds_and_bad_input():
    rng = np.random.default_rng(1)
    per_layer, glob = layer_bounds({"a": rng.standard_normal((8, 8)) * 0.01, "b": rng.standard_normal(32)})
    assert [b.name for b in per_layer] == ["a", "b"] and glob.parameters == 96
    assert per_layer[0].ratio > per_layer[1].ratio  # the small-magnitude layer prunes further
    with pytest.raises(UsageError):
        magnitude_bound(np.ones(3), tolerance=0.1, sharpness=0.0)


torch = pytest.importorskip("torch")


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _tiny_problem():
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()  # 144 + 64 = 208 weights
    x = torch.randn(64, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (64,))
    # a few steps of training so the Hessian is that of a (non-trivial) trained point
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(50):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, (x, y)


def test_slq_density_matches_dense_hessian_moments():
    from torch import nn

    from mpcompile.limit import density_moments, prunable_parameters, slq_density

    model, (x, y) = _tiny_problem()
    params = [p for _, p in prunable_parameters(model)]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    dim = sum(sizes)
    assert dim <= 300

    def loss_of(flat):
        ws = [t.reshape(s) for t, s in zip(torch.split(flat, sizes), shapes)]
        h = torch.tanh(x @ ws[0].T + model[0].bias)
        return nn.functional.cross_entropy(h @ ws[1].T + model[2].bias, y)

    flat0 = torch.cat([p.detach().reshape(-1) for p in params])
    hess = torch.autograd.functional.hessian(loss_of, flat0).numpy()
    eig = np.linalg.eigvalsh((hess + hess.T) / 2)

    nodes, weights = slq_density(model, lambda m, d: nn.functional.cross_entropy(m(d[0]), d[1]), (x, y),
                                 iters=40, probes=60, params=params, seed=0)
    assert weights.shape == (60, 40)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-9)  # each probe's density integrates to 1
    moments = density_moments(nodes, weights)
    assert moments["mean"] == pytest.approx(eig.mean(), rel=0.05)
    assert moments["second"] == pytest.approx(np.mean(eig**2), rel=0.08)  # measured: −4.0 %
    assert nodes.max() == pytest.approx(eig.max(), rel=1e-3)  # Lanczos finds the top eigenvalue


def test_predict_limit_on_tiny_model_uses_trace_curvature():
    from mpcompile.limit import predict_limit, prunable_parameters
    from mpcompile.numerics.pruning_limit import magnitude_bound as bound

    model, data = _tiny_problem()
    result = predict_limit(model, data, tolerance=0.05, iters=30, probes=8)
    flat = np.concatenate([p.detach().numpy().ravel() for _, p in prunable_parameters(model)])
    assert result.parameters == flat.size and result.curvature > 0
    assert result.ratio == pytest.approx(bound(flat, 0.05, result.curvature).ratio)
    looser = predict_limit(model, data, tolerance=0.5, iters=30, probes=8)
    assert looser.ratio > result.ratio
