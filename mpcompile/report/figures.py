"""One wording for each headline figure, shared by the console, Markdown and HTML reports.

Why: the same MAC count was printed three ways (the console fell back to the weight's
parameter count, the JSON said ``null``, the HTML "—"), and a percentage over the layers whose
MACs are known read "100 % eligible" with most of them unknown. Every human-readable report
builds these sentences from the JSON report's fields, so they cannot disagree with it or with
each other; where a MAC count is unknown they say how many of how many layers, not a percentage.
"""

from __future__ import annotations

from typing import Any

from mpcompile.report.console import format_count

__all__ = ["UNKNOWN", "CHOICE_HEADER", "calibration_protocol_summary", "choice_rows", "choice_summary",
           "macs_cell", "macs_summary", "selection_summary", "speedup_summary", "unknown_macs_note"]

UNKNOWN = "–"


def macs_cell(macs: int | None) -> str:
    """A layer's MACs in a table: ``4.1k``, or ``–`` when shape inference could not tell."""
    return UNKNOWN if macs is None else format_count(macs)


def macs_summary(summary: dict[str, Any]) -> str:
    """The analysis summary's MAC sentence (``AnalysisResult.summary()``)."""
    unknown = summary.get("macs_unknown_layers") or 0
    total = format_count(summary["total_gemm_macs"])
    if unknown:
        return f"GEMM MACs {total} known; {unknown} of {summary['layers']} layers with unknown MACs"
    frac = summary.get("eligible_mac_fraction")
    return f"GEMM MACs {total}" + (f", {100 * frac:.1f}% eligible" if frac is not None else "")


def selection_summary(sel: dict[str, Any]) -> str:
    """How much became 2:4 (the report's ``selection`` block)."""
    head = f"{sel['sparse_layers']} layers made 2:4"
    sparse, eligible = format_count(sel["sparse_macs"]), format_count(sel["eligible_macs"])
    unknown = sel.get("unknown_macs_layers") or 0
    if unknown:
        return (f"{head}: {sparse} of {eligible} known eligible GEMM MACs; {unknown} of "
                f"{sel['eligible_layers']} eligible layers with unknown MACs")
    return f"{head} = {100 * sel['sparse_fraction_of_eligible']:.1f}% of eligible GEMM MACs ({sparse} of {eligible})"


def unknown_macs_note(item: dict[str, Any]) -> str:
    """``; 2 of 3 layers with unknown MACs not modeled`` for a speedup row, or ``""``."""
    unknown = item.get("unknown_macs_layers") or 0
    return f"; {unknown} of {item['layers']} layers with unknown MACs not modeled" if unknown else ""


def speedup_summary(item: dict[str, Any]) -> str:
    """``A40 (modeled, FP32, other dynamic dims=1): 1.00× end to end, …`` for one speedup row."""
    shapes = f", {item['shapes']}" if item.get("shapes") else ""
    return (f"{item['gpu']} ({item['kind']}, {item.get('precision', 'fp16').upper()}{shapes}): "
            f"{item['speedup']:.2f}× end to end, {item['gemm_speedup']:.2f}× on GEMMs; "
            f"Amdahl bound {item['amdahl_bound']:.2f}×" + unknown_macs_note(item))


def calibration_protocol_summary(item: dict[str, Any] | None) -> str:
    """How the layer statistics were taken, one phrase (JSON ``calibration_protocol``)."""
    protocol = (item or {}).get("protocol")
    passes = (item or {}).get("capture_passes", 0)
    if protocol is None:
        return "none (data-free method)"
    how = ("each depth group captured on the model with the earlier groups already 2:4" if protocol == "sequential"
           else "one capture over the dense model")
    return f"{protocol} ({how}; {passes} capture pass{'es' if passes != 1 else ''})"


CHOICE_HEADER = ["layers", "2:4", "gain", "drift alone", "drift before", "drift after", "why"]


def _drift(value: float | None) -> str:
    return UNKNOWN if value is None else f"{value:.4f}"


def choice_rows(choice: dict[str, Any]) -> list[list[str]]:
    """One row per unit of the ``--max-drift`` layer choice (the report's ``selection.choice``)."""
    unit = "µs (modeled)" if choice.get("gpu") else "MACs"
    rows = []
    for u in choice["units"]:
        gain = f"{u['gain']:.3g} {unit}" if u["gain"] > 0 else "none"
        rows.append([", ".join(u["layers"]), "yes" if u["accepted"] else "no", gain, _drift(u.get("drift_alone")),
                     _drift(u.get("drift_before")), _drift(u.get("drift_after")), u["reason"]])
    return rows


def choice_summary(choice: dict[str, Any]) -> str:
    """``--max-drift 0.05 on A100-SXM4-80GB: 3 of 8 units 2:4, drift 0.041 …, modeled 1.21×``."""
    units = choice["units"]
    chosen = sum(u["accepted"] for u in units)
    head = f"layer choice for --max-drift {choice['max_drift']:g}" + (f" on {choice['gpu']}" if choice.get("gpu") else "")
    text = (f"{head}: {chosen} of {len(units)} units made 2:4 (gain = {choice['gain']}); measured drift "
            f"{choice['drift_on_calibration']:.4f} on {choice['calibration_samples']} calibration samples, "
            f"{choice['evaluations']} ONNX Runtime passes")
    if choice.get("modeled_speedup") is not None:
        text += (f"; modeled {choice['modeled_speedup']:.2f}× end to end on {choice['gpu']} "
                 f"({choice['modeled_speedup_precision'].upper()} engine, modeled, not measured)")
    return text
