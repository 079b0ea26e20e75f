"""``mpcompile limit``: how far can this model be magnitude-pruned before the loss rises? (seed 002)"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rich.table import Table

from mpcompile.report.console import format_count, stderr_console, stdout_console
from mpcompile.errors import OptionalDependencyError, UsageError
from mpcompile.numerics.pruning_limit import (
    DATA_FREE_LABEL,
    DEFAULT_SHARPNESS,
    DEFAULT_TOLERANCE,
    MagnitudeBound,
    layer_bounds,
)
from mpcompile.report.json_report import dumps, report_header

__all__ = ["register", "run"]

EXAMPLES = f"""\
examples:
  mpcompile limit model.onnx                       # data-free magnitude bound, per layer and global
  mpcompile limit model.onnx --sharpness 0.01      # with a curvature you measured elsewhere
  mpcompile limit --bundled digits_cnn             # + Hessian (SLQ) bound on the calib split (needs torch)

the bound (a second-order approximation of seed 002's Gaussian-width limit):
  removing the smallest-|w| weights S raises the loss by ≈ ½·κ·Σ_S w² (κ = tr(H)/D, the
  curvature a random direction sees), so the predicted limit is
      ρ* = max{{ k/D : Σ_(i≤k) w_(i)² ≤ 2ε/κ }}       (ascending magnitudes, ε = --tolerance)
  "{DATA_FREE_LABEL}": κ = --sharpness (default {DEFAULT_SHARPNESS}, an assumption, not a measurement).
  "Hessian (SLQ) bound": κ from stochastic Lanczos quadrature of the cross-entropy Hessian.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "limit",
        help="predicted pruning limit from weight magnitudes (+ Hessian spectrum with torch and data)",
        description=(
            "Estimate the largest fraction of GEMM/Conv weights that one-shot magnitude pruning can "
            "remove while the loss rises by at most ε. ONNX models get the data-free magnitude bound "
            "(assumed curvature); bundled models with torch installed also get the Hessian bound, "
            "whose curvature comes from the SLQ spectral density on the calibration split."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", nargs="?", help="ONNX model")
    parser.add_argument("--bundled", metavar="NAME", help="a bundled model (digits_cnn, digits_vit, digits_mlp)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"ε: allowed loss rise in nats (default {DEFAULT_TOLERANCE})")
    parser.add_argument("--sharpness", type=float, default=DEFAULT_SHARPNESS,
                        help=f"assumed curvature κ of the data-free bound (default {DEFAULT_SHARPNESS})")
    parser.add_argument("--iters", type=int, default=24, help="Lanczos steps per probe (default 24)")
    parser.add_argument("--probes", type=int, default=3, help="SLQ random probes (default 3)")
    parser.add_argument("--no-hessian", action="store_true", help="bundled model: data-free bound only")
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of tables")
    parser.add_argument("-o", "--output", metavar="REPORT.json", help="write the JSON report here")
    parser.add_argument("--force", action="store_true", help="replace an existing -o file")
    parser.set_defaults(handler=run)


def _onnx_weights(path: str) -> dict[str, Any]:
    from mpcompile.io.model_io import load_model
    from mpcompile.passes.gemm_discovery import discover_gemms

    loaded = load_model(path)
    weights, seen = {}, set()
    for layer in discover_gemms(loaded.model):
        if layer.weight_key in seen:  # a shared weight is pruned once
            continue
        seen.add(layer.weight_key)
        weights[layer.name] = layer.matrix()
    return weights


def _torch_weights(name: str) -> tuple[Any, dict[str, Any]]:
    try:
        from mpcompile.limit import prunable_parameters
        from mpcompile.zoo.digits import load_bundled_module
    except OptionalDependencyError:
        raise
    except ModuleNotFoundError as exc:
        raise OptionalDependencyError("torch", "torch", "the bundled models' pruning limit") from exc
    module = load_bundled_module(name)
    return module, {n: p.detach().double().numpy() for n, p in prunable_parameters(module)}


def _table(title: str, rows: list[MagnitudeBound]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("weights", "D", "Σw²", "budget 2ε/κ", "ρ*"):
        table.add_column(column, justify="left" if column == "weights" else "right")
    for b in rows:
        table.add_row(b.name, format_count(b.parameters), f"{b.total_energy:.4g}", f"{b.energy_budget:.4g}",
                      f"{b.ratio:.3f}", style="bold" if b.name == "global" else None)
    return table


def run(args: argparse.Namespace) -> int:
    if bool(args.model) == bool(args.bundled):
        raise UsageError("give either an ONNX model or --bundled NAME")
    from mpcompile.io.outputs import RunOutputs, model_files

    err = stderr_console(quiet=getattr(args, "quiet", False))
    out = stdout_console()
    outputs = RunOutputs(model_files(args.model) if args.model and Path(args.model).is_file() else [args.model],
                         force=args.force)
    if args.output:
        outputs.add(args.output, "-o")  # refused before any work
    module = None
    if args.bundled:
        from mpcompile.zoo.bundled import bundled_model_path, check_bundled_name

        check_bundled_name(args.bundled)
        if args.no_hessian:
            weights = _onnx_weights(str(bundled_model_path(args.bundled)))
        else:
            module, weights = _torch_weights(args.bundled)
        source = f"bundled:{args.bundled}"
    else:
        weights = _onnx_weights(args.model)
        source = args.model
    per_layer, glob = layer_bounds(weights, args.tolerance, args.sharpness)
    report: dict[str, Any] = report_header("limit", None, source=source, tolerance=args.tolerance,
                                           data_free={"label": DATA_FREE_LABEL, "sharpness": args.sharpness,
                                                      "global": glob.to_dict(),
                                                      "layers": [b.to_dict() for b in per_layer]})
    hessian = None
    if module is not None:
        from mpcompile.limit import predict_limit
        from mpcompile.zoo.bundled import load_digits_split

        x, y = load_digits_split("calib")
        if args.bundled == "digits_mlp":
            x = x.reshape(len(x), -1)
        with err.status(f"SLQ: {args.probes} probes × {args.iters} Hessian-vector products on the calib split"):
            hessian = predict_limit(module, (x, y), tolerance=args.tolerance, iters=args.iters, probes=args.probes)
        report["hessian"] = hessian.to_dict()
    if args.json:
        sys.stdout.write(dumps(report) + "\n")
    else:
        out.print(_table(f"{DATA_FREE_LABEL} — κ = {args.sharpness:g} (assumed), ε = {args.tolerance:g}",
                         [*per_layer, glob]))
        if hessian is not None:
            out.print(
                f"Hessian (SLQ) bound: κ = tr(H)/D = {hessian.curvature:.4g} (λmax ≈ {hessian.lambda_max:.3g}, "
                f"negative mass {hessian.negative_mass:.2f}, loss {hessian.loss:.4f} on calib) → "
                f"[bold]ρ* = {hessian.ratio:.3f}[/] of {format_count(hessian.parameters)} weights"
            )
        out.print("ρ*: predicted largest global one-shot magnitude-pruning ratio with loss rise ≤ ε; "
                  "a second-order approximation of seed 002's bound (see --help)", style="dim")
    if args.output:
        with outputs:
            outputs.write_text(args.output, dumps(report) + "\n")
            outputs.commit()
        err.print(f"report: {args.output}")
    return 0
