"""Hessian-based pruning limit (seed 002): SLQ spectral density of the loss Hessian → ρ*.

Why stochastic Lanczos quadrature: the Hessian of even a small network has D² entries, but a
Hessian-vector product costs two backward passes. m Lanczos steps from a random unit probe v
give a tridiagonal T whose eigenvalues θ_j (Ritz values) and squared first eigenvector
components τ_j form a Gauss quadrature of the spectral measure seen from v:
``vᵀ f(H) v ≈ Σ_j τ_j f(θ_j)`` (exact for polynomials of degree < 2m). With Rademacher probes
``E[vᵀ f(H) v] = tr f(H)/D``, so averaging over probes estimates the spectral density.

The density gives the curvature κ that the second-order bound of
:mod:`mpcompile.numerics.pruning_limit` needs:

- ``"trace"`` (default): κ = tr(H)/D = ∫ λ dμ — the curvature a direction not aligned with
  the Hessian's eigenvectors sees (the random-direction assumption of the paper's
  Gaussian-width argument).
- ``"abs-trace"``: κ = ∫ |λ| dμ — the same with the negative part of a non-convex Hessian
  counted as sharpness instead of cancelling it.

and ρ* = max{k/D : Σ_{i≤k} w_(i)² ≤ 2ε/κ}. This approximates the paper's Gaussian-width bound;
it is not the bound itself. Only torch imports live here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from mpcompile.errors import OptionalDependencyError, UsageError
from mpcompile.numerics.pruning_limit import DEFAULT_TOLERANCE, MagnitudeBound, magnitude_bound

try:
    import torch
    from torch import nn
except ModuleNotFoundError as exc:  # pragma: no cover - exercised only without the extra
    raise OptionalDependencyError("torch", "torch", "the Hessian pruning limit") from exc

__all__ = [
    "HESSIAN_LABEL",
    "LimitResult",
    "density_moments",
    "global_magnitude_prune",
    "hessian_vector_product",
    "measure_limit",
    "predict_limit",
    "prunable_parameters",
    "slq_density",
]

logger = logging.getLogger(__name__)

HESSIAN_LABEL = "Hessian (SLQ) bound"
CURVATURES = ("trace", "abs-trace")


@dataclass
class LimitResult:
    """Predicted pruning limit of a model from its Hessian spectral density.

    Attributes:
        ratio: ρ*, the predicted largest global magnitude-pruning ratio.
        curvature: κ used in the bound.
        curvature_kind: ``trace`` or ``abs-trace``.
        tolerance: ε, the allowed loss rise (nats).
        parameters: D, the prunable weights (Linear/Conv weights) the Hessian is taken over.
        loss: the loss at the dense weights on the data batch.
        trace_per_param: ∫ λ dμ (tr H / D).
        second_moment: ∫ λ² dμ (tr H² / D).
        lambda_max / lambda_min: extreme Ritz values seen.
        negative_mass: density mass on λ < −10⁻³·max|λ| (non-convexity).
        nodes / weights: probe-averaged density as (Ritz value, weight) pairs, weights sum to 1.
        bound: the magnitude bound evaluated with κ.
    """

    ratio: float
    curvature: float
    curvature_kind: str
    tolerance: float
    parameters: int
    loss: float
    trace_per_param: float
    second_moment: float
    lambda_max: float
    lambda_min: float
    negative_mass: float
    nodes: list[float] = field(repr=False)
    weights: list[float] = field(repr=False)
    bound: MagnitudeBound | None = None
    label: str = HESSIAN_LABEL

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["bound"] = self.bound.to_dict() if self.bound else None
        return data


def prunable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The weights magnitude pruning acts on: every Linear/Conv weight (not biases, norms, embeddings)."""
    names = {id(m.weight): f"{prefix}.weight" if prefix else "weight"
             for prefix, m in model.named_modules()
             if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))}
    return [(name, p) for name, p in model.named_parameters() if id(p) in names]


def hessian_vector_product(
    loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]
) -> tuple[Callable[[torch.Tensor], torch.Tensor], float]:
    """``v ↦ Hv`` over ``params`` (flattened), by double backward; also the loss value."""
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat_grad = torch.cat([g.reshape(-1) for g in grads])

    def hvp(v: torch.Tensor) -> torch.Tensor:
        hv = torch.autograd.grad(flat_grad, params, grad_outputs=v.to(flat_grad.dtype), retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]).detach()

    return hvp, float(loss.detach())


def _lanczos(hvp: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor, iters: int) -> tuple[np.ndarray, np.ndarray]:
    """Ritz values and quadrature weights of m Lanczos steps from ``v0`` (full reorthogonalisation)."""
    dim = v0.numel()
    m = min(iters, dim)
    basis = torch.zeros(m, dim, dtype=v0.dtype)
    alphas, betas = [], []
    v = v0 / v0.norm()
    for j in range(m):
        basis[j] = v
        w = hvp(v)
        alpha = float(torch.dot(w, v))
        alphas.append(alpha)
        # two passes of Gram–Schmidt against all previous vectors keep T accurate at m ≈ D
        for _ in range(2):
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = float(w.norm())
        if j == m - 1 or beta < 1e-10 * max(1.0, abs(alpha)):
            break
        betas.append(beta)
        v = w / beta
    t = np.diag(alphas) + np.diag(betas[: len(alphas) - 1], 1) + np.diag(betas[: len(alphas) - 1], -1)
    theta, vecs = np.linalg.eigh(t)
    return theta, vecs[0] ** 2


def slq_density(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], torch.Tensor],
    data: Any = None,
    *,
    iters: int = 32,
    probes: int = 4,
    params: Sequence[torch.Tensor] | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Hessian spectral density by stochastic Lanczos quadrature.

    ``loss_fn(model)`` (or ``loss_fn(model, data)`` when ``data`` is given) returns the scalar
    loss over the batch. Returns ``(nodes, weights)`` of shape ``[probes, iters]``: Ritz values
    and Gauss weights per probe (each row of weights sums to 1; rows shorter than ``iters``
    when Lanczos breaks down early are zero-padded). The probe-averaged density is
    ``weights / probes`` on ``nodes``.
    """
    if iters < 1 or probes < 1:
        raise UsageError(f"SLQ needs iters ≥ 1 and probes ≥ 1, got {iters}, {probes}")
    params = list(params) if params is not None else [p for _, p in prunable_parameters(model)]
    closure = (lambda: loss_fn(model)) if data is None else (lambda: loss_fn(model, data))
    hvp, _ = hessian_vector_product(closure, params)
    dim = sum(p.numel() for p in params)
    dtype = params[0].dtype
    gen = torch.Generator().manual_seed(seed)
    nodes = np.zeros((probes, min(iters, dim)))
    weights = np.zeros_like(nodes)
    for k in range(probes):
        rademacher = torch.randint(0, 2, (dim,), generator=gen, dtype=torch.int64).to(dtype) * 2 - 1
        theta, tau = _lanczos(hvp, rademacher, iters)
        nodes[k, : theta.size], weights[k, : tau.size] = theta, tau
    logger.debug("SLQ: D=%d, %d probes × %d steps, λ ∈ [%.3g, %.3g]", dim, probes, iters, nodes.min(), nodes.max())
    return nodes, weights


def density_moments(nodes: np.ndarray, weights: np.ndarray) -> dict[str, float]:
    """Probe-averaged ∫λ, ∫λ², ∫|λ| and the negative mass of an SLQ density."""
    w = weights / weights.shape[0]
    # Ritz values within ±1e-3·max|λ| of zero are the flat bulk, not non-convexity
    flat = 1e-3 * float(np.abs(nodes).max()) if nodes.size else 0.0
    return {
        "mean": float(np.sum(w * nodes)),
        "second": float(np.sum(w * nodes**2)),
        "abs_mean": float(np.sum(w * np.abs(nodes))),
        "negative_mass": float(np.sum(w[nodes < -flat])),
    }


def _cross_entropy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = data
    return nn.functional.cross_entropy(model(x), y)


def predict_limit(
    model: nn.Module,
    data: tuple[Any, Any],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    curvature: str = "trace",
    iters: int = 32,
    probes: int = 4,
    max_samples: int = 512,
    seed: int = 0,
) -> LimitResult:
    """ρ* of ``model`` from the cross-entropy Hessian on ``data = (inputs, labels)``.

    The model is put in eval mode (BatchNorm uses its running statistics, as at inference);
    parameters are not changed.
    """
    if curvature not in CURVATURES:
        raise UsageError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    x, y = (torch.as_tensor(np.asarray(a)) for a in data)
    named = prunable_parameters(model)
    x, y = x[:max_samples].to(named[0][1].dtype), y[:max_samples].long()
    model.eval()
    params = [p for _, p in named]
    nodes, weights = slq_density(model, _cross_entropy, (x, y), iters=iters, probes=probes, params=params, seed=seed)
    moments = density_moments(nodes, weights)
    kappa = moments["mean"] if curvature == "trace" else moments["abs_mean"]
    if kappa <= 0:
        raise UsageError(f"the Hessian has non-positive mean curvature ({kappa:.3g}): not at a minimum")
    with torch.no_grad():
        loss = float(_cross_entropy(model, (x, y)))
        flat = torch.cat([p.detach().reshape(-1) for p in params]).double().numpy()
    bound = magnitude_bound(flat, tolerance, kappa, name="global", label=HESSIAN_LABEL)
    avg_w = weights / weights.shape[0]
    return LimitResult(
        ratio=bound.ratio,
        curvature=kappa,
        curvature_kind=curvature,
        tolerance=tolerance,
        parameters=int(flat.size),
        loss=loss,
        trace_per_param=moments["mean"],
        second_moment=moments["second"],
        lambda_max=float(nodes.max()),
        lambda_min=float(nodes.min()),
        negative_mass=moments["negative_mass"],
        nodes=nodes.ravel().tolist(),
        weights=avg_w.ravel().tolist(),
        bound=bound,
    )


@torch.no_grad()
def global_magnitude_prune(model: nn.Module, ratio: float) -> None:
    """Zero the ``ratio`` smallest-|w| entries over all prunable weights, in place (one threshold)."""
    params = [p for _, p in prunable_parameters(model)]
    flat = torch.cat([p.abs().reshape(-1) for p in params])
    k = round(ratio * flat.numel())
    if k <= 0:
        return
    order = torch.argsort(flat, stable=True)
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[order[:k]] = False
    start = 0
    for p in params:
        n = p.numel()
        p.mul_(keep[start : start + n].reshape(p.shape).to(p.dtype))
        start += n


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(dim=1) == y).float().mean())


def measure_limit(
    build: Callable[[], nn.Module],
    test: tuple[Any, Any],
    *,
    max_drop: float = 0.01,
    step: float = 0.05,
) -> tuple[float, list[dict[str, float]]]:
    """Measured limit: the largest grid ratio r such that every ratio ≤ r loses ≤ ``max_drop`` accuracy.

    ``build()`` returns a fresh dense model each time (pruning is in place). Returns the
    ratio and the whole curve ``[{ratio, accuracy, drop}]``.
    """
    x, y = (torch.as_tensor(np.asarray(a)) for a in test)
    x, y = x.float(), y.long()
    dense = _accuracy(build(), x, y)
    curve, limit, ok = [], 0.0, True
    for ratio in np.round(np.arange(step, 1.0, step), 6):
        model = build()
        global_magnitude_prune(model, float(ratio))
        acc = _accuracy(model, x, y)
        drop = dense - acc
        curve.append({"ratio": float(ratio), "accuracy": acc, "drop": drop})
        if ok and drop <= max_drop + 1e-12:
            limit = float(ratio)
        else:
            ok = False
    return limit, curve
