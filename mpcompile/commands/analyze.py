"""``mpcompile analyze``: fit the MP law to every GEMM/Conv weight and print budgets."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rich.table import Table

from mpcompile.analyze import Analysis, analyze_loaded, weights_to_analyze
from mpcompile.commands._args import (
    add_force_arg,
    add_shape_args,
    add_spectral_args,
    analyze_options_from_args,
    shape_spec_from_args,
)
from mpcompile.io.model_io import load_model
from mpcompile.io.outputs import RunOutputs, protected_files
from mpcompile.report.console import format_float, progress_callback, stderr_console, stdout_console
from mpcompile.report.figures import macs_cell, macs_summary
from mpcompile.report.json_report import dumps, report_header

__all__ = ["register", "run", "analysis_report", "render_analysis_table"]

EXAMPLES = """\
examples:
  mpcompile analyze model.onnx
  mpcompile analyze model.onnx --shape input_ids:1x128 -o report.json
  mpcompile analyze model.onnx --annotate model.annotated.onnx
  mpcompile analyze model.onnx --json | jq '.layers[] | {name, spikes: .mp.spikes}'
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="spectral analysis of every GEMM/Conv weight (MP fit, spikes, pruning budget)",
        description=(
            "Fit the Marchenko–Pastur law to every GEMM and convolution weight, viewed as the "
            "out × reduction matrix TensorRT groups, and report σ², the bulk edge σ+, spikes, "
            "bulk fraction, fit error and the Spectral-Edge-Budgeting weight that decides which "
            "layers go 2:4 first. The input model is never modified."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="ONNX model (external data must sit in its folder)")
    parser.add_argument("-o", "--output", metavar="REPORT.json", help="write the JSON report here")
    parser.add_argument("--json", action="store_true", help="print the JSON report to stdout instead of a table")
    parser.add_argument("--annotate", metavar="OUT.onnx",
                        help="write a copy of the model with mpcompile.* entries in each node's metadata_props")
    add_force_arg(parser)
    add_shape_args(parser)
    add_spectral_args(parser)
    parser.set_defaults(handler=run)


def run_analysis(args: argparse.Namespace, model_path: str) -> Analysis:
    """Load + analyse with a progress bar on stderr (shared with ``demo`` and the pipeline)."""
    err = stderr_console(quiet=getattr(args, "quiet", False))
    loaded = load_model(model_path)
    spec = shape_spec_from_args(args)
    from mpcompile.checks.user_checks import check_dim_names

    check_dim_names(loaded.model, spec.dims)
    with progress_callback(err, "MP fit", weights_to_analyze(loaded), enabled=not args.json) as advance:
        return analyze_loaded(loaded, spec, analyze_options_from_args(args), advance)


def analysis_report(analysis: Analysis) -> dict[str, Any]:
    result = analysis.result
    return report_header(
        "analyze",
        analysis.loaded.path,
        shapes=analysis.shape_spec.describe(),
        options=result.options,
        summary=result.summary(),
        layers=[layer.to_dict() for layer in result.layers],
    )


def render_analysis_table(analysis: Analysis, console) -> None:
    result = analysis.result
    table = Table(title=f"Spectral analysis — {analysis.loaded.path.name}", title_justify="left")
    for column, justify in (
        ("layer", "left"), ("op", "left"), ("out×K", "right"), ("MACs", "right"), ("σ+", "right"),
        ("spikes", "right"), ("bulk %", "right"), ("μ", "right"), ("budget", "right"), ("2:4", "left"),
    ):
        table.add_column(column, justify=justify, overflow="fold")
    for analysis_row in result.layers:
        layer, fit = analysis_row.layer, analysis_row.fit
        budget = "–"
        if analysis_row.seb_weight is not None:
            budget = f"#{analysis_row.prune_rank} w={analysis_row.seb_weight:.2f}"
        eligible = "[green]eligible[/]" if layer.eligible else f"[yellow]no[/]: {layer.reason}"
        table.add_row(
            layer.name,
            layer.op_type,
            f"{layer.out_features}×{layer.reduction}",
            macs_cell(layer.macs),
            format_float(fit.sigma_plus if fit else None),
            str(fit.spikes) if fit else "–",
            f"{100 * fit.bulk_fraction:.1f}" if fit else "–",
            format_float(fit.fit_error if fit else None, 2),
            budget,
            eligible,
        )
    console.print(table)
    summary = result.summary()
    console.print(
        f"{summary['layers']} GEMM/Conv layers ({summary['unique_weights']} unique weights), "
        f"{summary['eligible_layers']} eligible for 2:4; {macs_summary(summary)}"
        f"; shapes: {analysis.shape_spec.describe()}; {summary['seconds']:.2f}s"
    )
    console.print(
        "budget: #rank and SEB weight w (w > 1: noise-like spectrum, made 2:4 first); "
        "μ: MP fit error; bulk %: singular values ≤ σ+", style="dim"
    )


def run(args: argparse.Namespace) -> int:
    """Outputs are guarded before the analysis runs and committed together after it."""
    from mpcompile.commands._inputs import onnx_input

    err = stderr_console(quiet=getattr(args, "quiet", False))
    with RunOutputs(protected_files(args.model) if Path(args.model).is_file() else [args.model],
                    force=args.force) as outputs:
        report_path = outputs.add(args.output, "-o") if args.output else None
        annotate_path = outputs.add(args.annotate, "--annotate") if args.annotate else None
        with onnx_input(args.model) as model_path:
            analysis = run_analysis(args, model_path)
        outputs.protect(protected_files(analysis.loaded.path, analysis.loaded.proto))
        report = analysis_report(analysis)
        if annotate_path is not None:
            outputs.save_model(analysis.loaded.model, annotate_path, external_data=_has_external(analysis))
            report["annotated"] = {"path": str(annotate_path),
                                   "files": [f.to_dict() for f in outputs.files(annotate_path)]}
        if report_path is not None:
            outputs.write_text(report_path, dumps(report) + "\n")
        if args.json:
            sys.stdout.write(dumps(report) + "\n")
        else:
            render_analysis_table(analysis, stdout_console())
        outputs.commit()
    if report_path is not None:
        err.print(f"report: {report_path}")
    if annotate_path is not None:
        err.print(f"annotated model: {annotate_path}")
    return 0


def _has_external(analysis: Analysis) -> bool:
    return any(t.data_location == 1 for t in analysis.loaded.proto.graph.initializer)
