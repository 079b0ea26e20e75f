"""``--only-profitable GPU``: the eligible layers TensorRT is predicted to run dense there.

Why a filter before the order and not after: a layer the speed model says stays dense
on that GPU would cost accuracy for no speed, so it never becomes a candidate.
"""

from __future__ import annotations

from mpcompile.selection.orders import Selection

__all__ = ["unprofitable", "explain_unprofitable"]


def unprofitable(analysis, gpu: str | None) -> dict[str, str]:
    """Layer name -> why it is predicted to run dense on ``gpu`` (empty without a GPU)."""
    if not gpu:
        return {}
    from mpcompile.trt.speedup import unprofitable_layers

    return unprofitable_layers(analysis.result.layers, gpu, analysis.shapes)


def explain_unprofitable(selection: Selection, kept_dense: dict[str, str], exclude: tuple[str, ...],
                         gpu: str | None) -> None:
    """Give each filtered layer (not also excluded by name) the reason the speed model gave."""
    for decision in selection.decisions:
        if decision.name in kept_dense and decision.name not in exclude:
            decision.reason = f"kept dense: predicted to run dense on {gpu} ({kept_dense[decision.name]})"
