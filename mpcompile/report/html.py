"""Human-readable reports: Markdown and a self-contained HTML page with plots.

Why self-contained: the page is attached to CI runs and tickets; plots are embedded PNGs
(matplotlib, Agg backend) so it renders anywhere without network access. Every speedup
figure carries its kind ("measured" or "modeled") from the JSON report; nothing here
computes a number that the JSON does not already hold, except the spectra it plots.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from mpcompile.errors import OptionalDependencyError
from mpcompile.numerics.mp_law import matrix_eigenvalues, mp_density
from mpcompile.report.figures import (CHOICE_HEADER, calibration_protocol_summary, choice_rows, choice_summary,
                                      macs_cell, selection_summary, speedup_summary, unknown_macs_note)

__all__ = ["render_markdown", "render_html", "write_reports"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as exc:
        raise OptionalDependencyError("matplotlib", "plots", "the HTML report") from exc
    return plt


def _png(fig) -> str:
    buffer = io.BytesIO()
    # tight_layout, not bbox_inches="tight": the latter renders every figure twice (~1 s each).
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    _pyplot().close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def esd_figure(spectra: list[tuple[str, np.ndarray, dict[str, Any]]]) -> str:
    """Histogram of λ = s²/n per layer with the fitted MP density and the edge λ+."""
    plt = _pyplot()
    cols = min(2, len(spectra))
    rows = -(-len(spectra) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, s2, mp) in zip(axes.ravel(), spectra):
        n = max(mp["rows"], mp["cols"])
        lam = s2 / n
        bulk = lam[lam <= 3 * mp["lambda_plus"]]
        ax.hist(bulk, bins=60, density=True, color="#8aa9c9", label="empirical ESD")
        grid = np.linspace(0, mp["lambda_plus"] * 1.05, 400)
        density = mp_density(grid / mp["sigma2"], mp["gamma"]) / mp["sigma2"]
        # the histogram is normalised over the plotted (bulk) share of eigenvalues only
        shown_share = bulk.size / lam.size
        ax.plot(grid, density / shown_share, color="#c0392b", lw=1.5, label=f"MP fit σ²={mp['sigma2']:.3g}")
        ax.axvline(mp["lambda_plus"], color="k", ls="--", lw=1, label="λ+ (bulk edge)")
        ax.set_title(f"{name}: {mp['spikes']} spikes, bulk {100 * mp['bulk_fraction']:.1f}%", fontsize=9)
        ax.set_xlabel("λ = s²/n")
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(spectra):]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


MAX_TICK_LABELS = 60


def _layer_ticks(ax, names: list[str]) -> None:
    """Layer names under the bars, at most MAX_TICK_LABELS of them: laying out one rotated label
    per layer took matplotlib ~10 s on a 300-layer model (the table has every name anyway)."""
    step = max(1, -(-len(names) // MAX_TICK_LABELS))
    ticks = list(range(0, len(names), step))
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90, fontsize=6)


def budget_figure(layers: list[dict[str, Any]]) -> str:
    """SEB weight per layer, coloured by the 2:4 decision."""
    plt = _pyplot()
    names = [layer["name"] for layer in layers]
    weights = [layer.get("seb_weight") or 0.0 for layer in layers]
    colors = ["#27ae60" if layer.get("sparse") else ("#bdc3c7" if layer.get("eligible") else "#e67e22")
              for layer in layers]
    fig, ax = plt.subplots(figsize=(min(max(6, 0.28 * len(names)), 0.28 * MAX_TICK_LABELS), 3.2))
    if len(names) > MAX_TICK_LABELS:  # one patch per bar is what makes matplotlib slow here
        ax.vlines(range(len(names)), 0, weights, colors=colors, lw=1.5)
    else:
        ax.bar(range(len(names)), weights, color=colors)
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_ylabel("SEB weight w (>1: prune first)")
    _layer_ticks(ax, names)
    ax.set_title("Spectral budget per layer — green: 2:4, grey: kept dense, orange: not eligible", fontsize=9)
    return _png(fig)


def latency_figure(per_layer: list[dict[str, Any]], kind: str) -> str:
    plt = _pyplot()
    names = [row["name"] for row in per_layer]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(min(max(6, 0.3 * len(names)), 0.3 * MAX_TICK_LABELS), 3.2))
    dense, sparse = [row["dense_us"] for row in per_layer], [row["sparse_us"] for row in per_layer]
    if len(names) > MAX_TICK_LABELS:  # lines, not one patch per bar (matplotlib: ~5 s per 600 bars)
        ax.plot(x, dense, lw=0.8, marker=".", ms=2, label="dense")
        ax.plot(x, sparse, lw=0.8, marker=".", ms=2, label="2:4")
    else:
        ax.bar(x - 0.2, dense, width=0.4, label="dense")
        ax.bar(x + 0.2, sparse, width=0.4, label="2:4")
    ax.set_ylabel(f"µs per layer ({kind})")
    _layer_ticks(ax, names)
    ax.legend(fontsize=7)
    return _png(fig)


def _largest_spectra(analysis_layers, count: int = 4) -> list[tuple[str, np.ndarray, dict[str, Any]]]:
    fitted = [a for a in analysis_layers if a.fit is not None and min(a.layer.out_features, a.layer.reduction) >= 16]
    fitted.sort(key=lambda a: -a.layer.out_features * a.layer.reduction)
    seen, out = set(), []
    for a in fitted:
        if id(a.layer.weight.root) in seen:
            continue
        seen.add(id(a.layer.weight.root))
        # The spectrum the law was fitted to: after a compile the layer's weight is the pruned one.
        s2 = a.fit.eigenvalues if a.fit.eigenvalues is not None else matrix_eigenvalues(a.layer.matrix())
        out.append((a.name, s2, a.fit.to_dict()))
        if len(out) == count:
            break
    return out


def validation_lines(report: dict[str, Any]) -> list[str]:
    """One line per graph output, as the console prints them.

    Why one function for Markdown and HTML: a degenerate dense output (near-constant or ~0 on the
    data) makes cosine and drift rounding noise, and a report that still quoted "cosine 0.0000"
    for it read as a broken model; every renderer must say "not meaningful" instead.
    """
    v = report.get("validation")
    if not v:
        return []
    outputs = [v, *v.get("others", [])]
    source = report.get("evaluation") or report.get("calibration") or "?"
    lines = []
    for c in outputs:
        name = f" output '{c['output']}'" if len(outputs) > 1 and c.get("output") else ""
        line = f"dense vs sparse{name} on {c['samples']} samples ({source}): "
        if c.get("degenerate"):
            lines.append(line + f"not meaningful, {c['degenerate']} (max |Δ| {c['max_abs_error']:.3g})")
            continue
        line += f"relative L2 drift {c['relative_l2']:.4f}, cosine {c['cosine_similarity']:.4f}"
        if c.get("top1_agreement") is not None:
            line += f", top-1 agreement {100 * c['top1_agreement']:.1f}%"
        if c.get("dense_accuracy") is not None:
            line += f", accuracy {100 * c['dense_accuracy']:.2f}% → {100 * c['sparse_accuracy']:.2f}%"
        lines.append(line)
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# mpcompile report — {Path(report.get('model', {}).get('path', '?')).name}", ""]
    lines.append(f"- created {report['created']} by mpcompile {report['tool']['version']} (`{report['command']}`)")
    if "method" in report:
        lines.append(f"- method **{report['method']}**, {selection_summary(report['selection'])}")
        lines.append(f"- calibration: {report['calibration']}")
        lines.append(f"- calibration protocol: {calibration_protocol_summary(report.get('calibration_protocol'))}")
        lines.append(f"- independent 2:4 check: {'passed' if report['check']['ok'] else 'FAILED'}")
    lines += [f"- {line}" for line in validation_lines(report)]
    for item in report.get("speedup", []) or []:
        lines.append(f"- speedup on {speedup_summary(item)}")
    for note in report.get("notes", []):
        lines.append(f"- note: {note}")
    choice = (report.get("selection") or {}).get("choice")
    if choice:
        lines += ["", "## Layer choice", "", choice_summary(choice), "",
                  "| " + " | ".join(CHOICE_HEADER) + " |", "|" + "---|" * len(CHOICE_HEADER)]
        lines += ["| " + " | ".join(row) + " |" for row in choice_rows(choice)]
    lines += ["", "| layer | op | out×K | MACs | σ+ | spikes | bulk % | μ | SEB w | 2:4 | why |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for layer in report["layers"]:
        lines.append("| " + " | ".join(_layer_cells(layer)) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _layer_cells(layer: dict[str, Any]) -> list[str]:
    mp = layer.get("mp") or {}
    bulk = mp.get("bulk_fraction")
    return [
        layer["name"],
        layer["op"],
        f"{layer['matrix_shape'][0]}×{layer['matrix_shape'][1]}",
        macs_cell(layer.get("macs")),
        _fmt(mp.get("sigma_plus"), ".3g"),
        _fmt(mp.get("spikes"), "d"),
        _fmt(None if bulk is None else 100 * bulk, ".1f"),
        _fmt(mp.get("fit_error"), ".3f"),
        _fmt(layer.get("seb_weight"), ".2f"),
        "yes" if layer.get("sparse") else "no",
        layer.get("decision") or layer.get("reason") or "",
    ]


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}"
    "img{max-width:100%}table{border-collapse:collapse;font-size:13px;margin:.5em 0}"
    "th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left}th{background:#f6f8fa}"
    "td.num{text-align:right;font-variant-numeric:tabular-nums}.headline{background:#f0f7ff;"
    "border-left:4px solid #0969da;padding:.6em 1.2em;margin:1em 0}.headline li{margin:.25em 0}"
    "code,pre{background:#f6f8fa;padding:2px 4px;font-size:12px}pre{padding:.8em;overflow-x:auto}"
    ".muted{color:#666;font-size:13px}"
)


def _table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td{' class=num' if i in numeric else ''}>{html.escape(str(c))}</td>"
                         for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _headline(report: dict[str, Any]) -> str:
    """What a reader needs first: what became 2:4, what it cost, what it may buy, what next."""
    items = []
    sel = report.get("selection")
    if sel:
        sparse = [layer["name"] for layer in report.get("layers", []) if layer.get("sparse")]
        items.append(f"<b>{html.escape(selection_summary(sel))}</b>{': ' + html.escape(', '.join(sparse[:6])) if sparse else ''}"
                     f"{' …' if len(sparse) > 6 else ''}; independent 2:4 check "
                     f"<b>{'passed' if report['check']['ok'] else 'FAILED'}</b>")
    items += [html.escape(line) for line in validation_lines(report)]
    rows = report.get("speedup") or []
    for item in rows:
        cal = item.get("calibrated")
        extra = f"; {item['fp16_speedup']:.2f}× if emitted as FP16" if "fp16_speedup" in item else ""
        extra += f"; with the measured efficiency curve {cal['speedup']:.2f}×" if cal else ""
        items.append(f"{html.escape(item['gpu'])}: <b>{item['speedup']:.2f}× end to end ({html.escape(item['kind'])})</b>, "
                     f"{html.escape(item.get('precision', 'fp16').upper())}, at {html.escape(item.get('shapes') or 'analysed shapes')}; "
                     f"Amdahl bound {item['amdahl_bound']:.2f}×{html.escape(unknown_macs_note(item) + extra)}")
    model = Path(report.get("output", {}).get("path", "") or report.get("model", {}).get("path", "model.sparse.onnx")).name
    dense = Path(report.get("model", {}).get("path", "model.onnx")).name
    nxt = (f"mpcompile build {model} --dense {dense}\n"
           f"trtexec --onnx={model} --sparsity=enable --fp16 --profilingVerbosity=detailed --dumpLayerInfo")
    if any(item.get("precision") in ("fp32", "tf32") for item in rows):
        nxt = f"mpcompile {dense} --fp16   # FP32 engines get no 2:4 kernels\n" + nxt
    lis = "".join(f"<li>{i}</li>" for i in items)
    return (f"<div class=headline><ul>{lis}</ul><p>Measure it on the GPU next:</p>"
            f"<pre>{html.escape(nxt)}</pre></div>")


def _speedup_table(report: dict[str, Any]) -> str:
    rows = []
    for item in report.get("speedup") or []:
        cal = item.get("calibrated")
        modeled = f"{item['layers'] - item['unknown_macs_layers']} of {item['layers']}" if "layers" in item else "–"
        rows.append([item["gpu"], item.get("shapes") or "", modeled, item.get("precision", "fp16").upper(), item["kind"],
                     f"{item['speedup']:.2f}×", f"{item['gemm_speedup']:.2f}×", f"{item['amdahl_bound']:.2f}×",
                     f"{item['fp16_speedup']:.2f}×" if "fp16_speedup" in item else "–",
                     f"{cal['speedup']:.2f}×" if cal else "no measurements for this GPU"])
    if not rows:
        return ""
    return _table(["GPU", "shapes", "layers modeled", "precision", "kind", "end to end", "GEMMs", "Amdahl bound",
                   "at FP16", "fitted curve"], rows, {5, 6, 7, 8})


def _meaningful_latency(item: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-layer rows worth plotting: marked layers whose modeled time actually changes."""
    return [row for row in item.get("per_layer") or [] if row.get("sparse") and row["sparse_us"] < row["dense_us"]]


def render_html(report: dict[str, Any], analysis_layers=None) -> str:
    sections = []
    speed = _speedup_table(report)
    if speed:
        sections.append(("<h2>Speedup (modeled unless marked measured)</h2>" + speed))
    choice = (report.get("selection") or {}).get("choice")
    if choice:
        sections.append(f"<h2>Layer choice</h2><p>{html.escape(choice_summary(choice))}</p>"
                        + _table(CHOICE_HEADER, choice_rows(choice), {3, 4, 5}))
    layer_rows = [_layer_cells(layer) for layer in report.get("layers", [])]
    sections.append("<h2>Layers</h2>" + _table(
        ["layer", "op", "out×K", "MACs", "σ+", "spikes", "bulk %", "μ", "SEB w", "2:4", "why"], layer_rows,
        {3, 4, 5, 6, 7, 8}))
    figures = []
    if analysis_layers:
        spectra = _largest_spectra(analysis_layers)
        if spectra:
            figures.append(("Spectra of the largest layers (fitted Marchenko–Pastur law)", esd_figure(spectra)))
    if report.get("layers"):
        figures.append(("Spectral budget and 2:4 decision per layer", budget_figure(report["layers"])))
    seen = set()
    for item in report.get("speedup", []) or []:
        rows = _meaningful_latency(item)
        if rows and item["gpu"] not in seen:
            seen.add(item["gpu"])
            figures.append((f"Per-layer latency of layers that get faster, {item['gpu']} ({item['kind']}, "
                            f"{item.get('precision', 'fp16').upper()}, {item.get('shapes') or ''})",
                            latency_figure(rows, item["kind"])))
    if report.get("speedup") and not seen:
        sections.append("<p class=muted>No per-layer latency plot: no 2:4 layer is modeled faster at these shapes "
                        "and precision (each keeps its dense time).</p>")
    sections += [f"<h2>{html.escape(t)}</h2><img alt='{html.escape(t)}' src='data:image/png;base64,{png}'/>"
                 for t, png in figures]
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.get("notes", []))
    meta = (f"<p class=muted>created {html.escape(str(report.get('created')))} by mpcompile "
            f"{html.escape(str(report.get('tool', {}).get('version')))} (<code>{html.escape(str(report.get('command')))}</code>)"
            f"{', method ' + html.escape(str(report['method'])) if 'method' in report else ''}"
            f"{'; calibration protocol ' + html.escape(calibration_protocol_summary(report.get('calibration_protocol'))) if 'method' in report else ''}</p>")
    title = html.escape(Path(report.get("model", {}).get("path", "?")).name)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>mpcompile report — {title}</title>"
        f"<style>{_CSS}</style></head><body><h1>mpcompile report — {title}</h1>{meta}{_headline(report)}"
        + "".join(sections) + (f"<h2>Notes</h2><ul>{notes}</ul>" if notes else "") + "</body></html>"
    )


def write_reports(report: dict[str, Any], stem: str | os.PathLike, analysis_layers=None) -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.html`` atomically; returns both paths."""
    from mpcompile.report.json_report import write_text

    md_path = write_text(render_markdown(report), f"{stem}.md")
    html_path = write_text(render_html(report, analysis_layers), f"{stem}.html")
    return md_path, html_path
