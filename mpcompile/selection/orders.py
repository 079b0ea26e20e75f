"""Which layers become 2:4: order by the spectral budget, stop at a MAC target.

Why order matters: when only part of the model can go sparse (a MAC target or a drift
budget), the Spectral-Edge-Budgeting rank puts first the layers whose spectrum is most
noise-like — the ones the seed papers found lose least when pruned. ``order="graph"`` is
the uniform baseline the benchmarks compare against. ``order="drift"`` is measured rather than
predicted: the pipeline masks every candidate, runs the model with each one sparse alone on
calibration data and ranks by output drift per MAC (see :func:`rank_by_measurement`); here it
starts from the MP order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mpcompile.errors import UsageError
from mpcompile.passes.spectral_analysis import AnalysisResult, LayerAnalysis

__all__ = ["LayerDecision", "Selection", "select_layers", "rank_by_measurement", "ORDERS"]

ORDERS = ("mp", "graph", "macs", "drift", "choice")
MEASURED_ORDERS = ("drift", "choice")


@dataclass
class LayerDecision:
    """The verdict for one layer, with the reason the report prints."""

    name: str
    sparse: bool
    reason: str
    rank: int | None
    macs: int  # what the target counts: the weight's parameter count where MACs are unknown
    macs_known: bool = True

    @property
    def reported_macs(self) -> int | None:
        """The MACs a report may print: None where shape inference could not tell."""
        return self.macs if self.macs_known else None


@dataclass
class Selection:
    decisions: list[LayerDecision]
    target: float
    order: str
    eligible_macs: int
    selected_macs: int
    ranking: list[str] = field(default_factory=list)  # candidates, first to be made sparse first
    choice: dict | None = None  # --order choice: every unit's verdict and the numbers behind it

    @property
    def ranked_selected(self) -> list[str]:
        """Selected layers in the order they were taken (what a drift budget trims from the end)."""
        chosen = set(self.selected_names)
        return [name for name in self.ranking if name in chosen]

    @property
    def selected_names(self) -> list[str]:
        return [d.name for d in self.decisions if d.sparse]

    @property
    def selected_fraction(self) -> float:
        return self.selected_macs / self.eligible_macs if self.eligible_macs else 0.0

    def macs_report(self) -> dict:
        """The report's figures: MACs summed over known counts only, and no fraction (None)
        when an eligible layer's MACs are unknown — the stand-in count steers the target but
        is not a MAC count to print."""
        candidates = set(self.ranking)
        eligible = [d for d in self.decisions if d.name in candidates]
        unknown = [d for d in eligible if not d.macs_known]
        return {
            "eligible_layers": len(eligible),
            "eligible_macs": sum(d.macs for d in eligible if d.macs_known),
            "sparse_macs": sum(d.macs for d in self.decisions if d.sparse and d.macs_known),
            "sparse_fraction_of_eligible": None if unknown else self.selected_fraction,
            "unknown_macs_layers": len(unknown),
        }


def _weight_macs(analysis: LayerAnalysis) -> int:
    layer = analysis.layer
    return layer.macs if layer.macs is not None else layer.out_features * layer.reduction


def ranked_eligible(result: AnalysisResult, order: str = "mp", exclude: set[str] = frozenset()) -> list[LayerAnalysis]:
    """Eligible layers (not excluded) in the order they would be made sparse."""
    if order not in ORDERS:
        raise UsageError(f"--order must be one of {ORDERS}, got {order!r}")
    eligible = [a for a in result.layers if a.layer.eligible and a.name not in exclude]
    if order in ("mp", *MEASURED_ORDERS):
        return sorted(eligible, key=lambda a: a.prune_rank if a.prune_rank is not None else 1 << 30)
    if order == "macs":
        return sorted(eligible, key=lambda a: -_weight_macs(a))
    return eligible


def select_layers(
    result: AnalysisResult,
    *,
    target: float = 1.0,
    order: str = "mp",
    exclude: set[str] = frozenset(),
    count: int | None = None,
) -> Selection:
    """Pick layers in ``order`` until ``target`` × eligible MACs are covered (or ``count`` layers).

    MACs come from shape inference; where unknown, the weight's parameter count stands in for
    the target (and the decision says ``macs_known=False``, so reports do not print it as MACs).
    """
    if not 0.0 <= target <= 1.0:
        raise UsageError(f"--target must be a fraction in [0, 1], got {target}")
    ranked = ranked_eligible(result, order, exclude)
    eligible_macs = sum(_weight_macs(a) for a in ranked)
    chosen: set[str] = set()
    covered = 0
    for index, analysis in enumerate(ranked):
        if count is not None:
            if index >= count:
                break
        elif covered >= target * eligible_macs - 1e-9 or target == 0.0:
            break
        chosen.add(analysis.name)
        covered += _weight_macs(analysis)
    decisions = []
    for analysis in result.layers:
        layer = analysis.layer
        macs, known = _weight_macs(analysis), layer.macs is not None
        if analysis.name in chosen:
            why = f"rank {analysis.prune_rank} by MP budget" if order == "mp" else f"{order} order"
            decisions.append(LayerDecision(analysis.name, True, why, analysis.prune_rank, macs, known))
        elif not layer.eligible:
            decisions.append(LayerDecision(analysis.name, False, f"not eligible: {layer.reason}", None, macs, known))
        elif analysis.name in exclude:
            decisions.append(LayerDecision(analysis.name, False, "excluded by --exclude", analysis.prune_rank,
                                           macs, known))
        else:
            decisions.append(
                LayerDecision(analysis.name, False, "kept dense: target reached (lower MP budget rank)"
                              if order == "mp" else "kept dense: target reached", analysis.prune_rank, macs, known)
            )
    return Selection(decisions, target, order, eligible_macs, covered, [a.name for a in ranked])


def rank_by_measurement(
    selection: Selection, cost: dict[str, float], target: float, groups: dict[str, list[str]] | None = None
) -> list[str]:
    """Re-rank the selected layers by measured ``cost`` per MAC and keep the cheapest ``target``.

    ``cost`` maps a weight (named by its first layer) to what making it sparse alone cost
    (output drift on calibration data); ``groups`` lists the layers sharing that weight, which
    move together. A greedy knapsack takes the lowest cost per sparse MAC first until
    ``target`` × eligible MACs are covered. Updates ``selection`` in place and returns the kept
    weights' names, cheapest first.
    """
    if not 0.0 <= target <= 1.0:
        raise UsageError(f"--target must be a fraction in [0, 1], got {target}")
    by_name = {d.name: d for d in selection.decisions}
    members = {name: (groups or {}).get(name, [name]) for name in cost}
    macs = {name: sum(by_name[m].macs for m in members[name]) for name in cost}
    ranked = sorted(cost, key=lambda n: (cost[n] / max(macs[n], 1), n))
    kept: list[str] = []
    covered = 0
    for name in ranked:
        if target == 0.0 or covered >= target * selection.eligible_macs - 1e-9:
            break
        kept.append(name)
        covered += macs[name]
    for rank, name in enumerate(ranked, start=1):
        for member in members[name]:
            decision = by_name[member]
            decision.rank = rank
            drift = f"drift {cost[name]:.3g} alone"
            if name in kept:
                decision.sparse, decision.reason = True, f"rank {rank} by measured {drift}"
            else:
                decision.sparse, decision.reason = False, f"kept dense: target reached (rank {rank}, {drift})"
    selection.target = target
    selection.ranking = [member for name in ranked for member in members[name]]
    selection.selected_macs = sum(d.macs for d in selection.decisions if d.sparse)
    return kept
