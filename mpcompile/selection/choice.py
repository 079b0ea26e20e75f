"""The accuracy-budget layer choice: most modeled gain for a measured output-drift budget.

Why this algorithm (``--max-drift D`` with calibration data, ``--order choice``):

- the objective is additive: a 2:4 layer saves its own modeled time (or MACs) and the rest of
  the model is unchanged, so the end-to-end modeled speedup grows with the sum of the chosen
  units' gains;
- the constraint is not: output errors of different layers add roughly in *energy*
  (drift², independent errors add in quadrature) but interact, so each unit's cost is
  re-measured on the model with the units accepted so far (one ONNX Runtime pass each);
- the order is a greedy knapsack by gain ÷ drift² increase, started from each unit's drift
  measured alone (one pass each) and *lazily* corrected: a unit whose measured increase in
  the accumulated model makes its ratio fall below the next candidate's estimate is deferred
  once and re-measured later. So every unit costs at most three passes;
- the Marchenko–Pastur rank is the data-free prior: it orders candidates whose estimated
  ratios are within :data:`PRIOR_TIE_TOLERANCE` of each other (a 64-sample drift is a noisy
  number), and never overrides a clear measured difference. ``prior="graph"`` replaces it by
  the graph order (the benchmark's "without the prior" arm).

Pure: it knows units by index and two measuring callables, nothing of ONNX.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

__all__ = ["Unit", "UnitDecision", "ChoiceOutcome", "choose_within_budget", "PRIOR_TIE_TOLERANCE"]

PRIOR_TIE_TOLERANCE = 0.2
"""Estimated gain/cost ratios within this relative band count as tied; the prior orders them."""
_TINY_COST = 1e-12


@dataclass
class Unit:
    """A group of layers made 2:4 together (one weight, or the layers reading one activation).

    ``gain``: modeled µs saved on the GPU (or MACs without one); ``gain_reason``: why that
    gain (the speed model's verdict); ``prior``: the MP rank (lower = prune first).
    """

    layers: list[str]
    gain: float
    gain_reason: str
    prior: int


@dataclass
class UnitDecision:
    """One unit's verdict with the numbers behind it (the report's per-layer explanation)."""

    layers: list[str]
    accepted: bool
    gain: float
    gain_reason: str
    prior: int
    drift_alone: float | None = None
    drift_before: float | None = None
    drift_after: float | None = None
    step: int | None = None
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ChoiceOutcome:
    decisions: list[UnitDecision]
    accepted: list[int]  # unit indices, in the order accepted
    drift: float  # measured drift of the accepted set (on the sample)
    evaluations: int
    notes: list[str] = field(default_factory=list)


def _ratio(gain: float, cost: float) -> float:
    return gain / max(cost, _TINY_COST)


def _bucket(ratio: float) -> int:
    """Log-spaced bands of width PRIOR_TIE_TOLERANCE: higher ratio → lower (earlier) key."""
    return -math.floor(math.log(max(ratio, 1e-300)) / math.log1p(PRIOR_TIE_TOLERANCE))


def choose_within_budget(
    units: list[Unit],
    max_drift: float,
    drift_alone: Callable[[int], float],
    drift_adding: Callable[[int], float],
    accept: Callable[[int], None],
    *,
    prior: str = "mp",
) -> ChoiceOutcome:
    """Greedy knapsack of ``units`` within ``max_drift``.

    ``drift_alone(i)``: drift with unit i alone 2:4; ``drift_adding(i)``: drift of the accepted
    units plus unit i (the callee reverts i afterwards); ``accept(i)``: make unit i 2:4 for good.
    Units without gain are rejected unmeasured: they would spend drift for no speed.
    """
    decisions = [UnitDecision(u.layers, False, u.gain, u.gain_reason, u.prior) for u in units]
    evaluations = 0
    heap: list[tuple[int, int, int]] = []
    cost: dict[int, float] = {}
    for index, unit in enumerate(units):
        decision = decisions[index]
        if unit.gain <= 0:
            decision.reason = f"kept dense: no modeled gain ({unit.gain_reason}), so any drift would buy nothing"
            continue
        alone = drift_alone(index)
        evaluations += 1
        decision.drift_alone = alone
        if alone > max_drift:
            decision.reason = f"kept dense: drift {alone:.3g} alone exceeds --max-drift {max_drift:g}"
            continue
        cost[index] = alone ** 2
        tie = unit.prior if prior == "mp" else index
        heapq.heappush(heap, (_bucket(_ratio(unit.gain, cost[index])), tie, index))

    accepted: list[int] = []
    deferred: set[int] = set()
    current = 0.0
    while heap:
        _, _, index = heapq.heappop(heap)
        unit, decision = units[index], decisions[index]
        after = drift_adding(index)
        evaluations += 1
        decision.drift_before, decision.drift_after = current, after
        if after > max_drift:
            decision.reason = (f"kept dense: over budget, drift {current:.3g} → {after:.3g} with it "
                               f"> --max-drift {max_drift:g}")
            continue
        increase = max(after ** 2 - current ** 2, _TINY_COST)
        bucket = _bucket(_ratio(unit.gain, increase))
        if index not in deferred and heap and bucket > heap[0][0]:
            deferred.add(index)  # interactions made it costlier than the next estimate: re-measure later
            cost[index] = increase
            heapq.heappush(heap, (bucket, unit.prior if prior == "mp" else index, index))
            continue
        accept(index)
        accepted.append(index)
        decision.accepted, decision.step = True, len(accepted)
        decision.reason = (f"chosen (step {len(accepted)}): drift {current:.3g} → {after:.3g} "
                           f"≤ --max-drift {max_drift:g}" + (" after re-measuring" if index in deferred else ""))
        current = after
    return ChoiceOutcome(decisions, accepted, current, evaluations)
