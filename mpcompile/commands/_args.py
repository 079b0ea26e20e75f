"""Argument groups shared by several subcommands (Polygraphy-style)."""

from __future__ import annotations

import argparse

from mpcompile.analyze import AnalyzeOptions
from mpcompile.io.shapes import DEFAULT_DYNAMIC_DIM, ShapeSpec, expand_dim_sets, parse_shape_args

__all__ = ["add_force_arg", "add_shape_args", "shape_spec_from_args", "shape_specs_from_args", "add_spectral_args",
           "analyze_options_from_args"]


def add_shape_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("input shapes (for MAC counts and calibration)")
    group.add_argument(
        "--shape",
        action="append",
        metavar="NAME:DIMS",
        help="static shape of a model input, e.g. --shape input:8x3x224x224 (repeatable)",
    )
    group.add_argument(
        "--dim",
        action="append",
        metavar="NAME=INT[,INT...]",
        help="value of a named dynamic dimension, e.g. --dim batch=8 --dim sequence=128; several values "
             "(--dim batch=1,8,32) give one modeled-speedup row per shape set, the first is used for MACs",
    )
    group.add_argument(
        "--default-dim",
        type=int,
        default=DEFAULT_DYNAMIC_DIM,
        metavar="INT",
        help=f"value of any other dynamic dimension (default: {DEFAULT_DYNAMIC_DIM})",
    )


def shape_spec_from_args(args: argparse.Namespace) -> ShapeSpec:
    """The first shape set (``--dim batch=1,8`` → batch=1): MACs, calibration, engines."""
    return shape_specs_from_args(args)[0]


def shape_specs_from_args(args: argparse.Namespace) -> list[ShapeSpec]:
    """Every shape set the ``--dim`` values span (one unless a --dim lists several values)."""
    return [parse_shape_args(args.shape, dims, args.default_dim) for dims in expand_dim_sets(args.dim)]


def add_spectral_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("spectral analysis (Marchenko–Pastur fit and budgets)")
    group.add_argument("--alpha", type=float, default=0.25,
                       help="BEMA window trim: fit on the central [α, 1−α] eigenvalues (default 0.25)")
    group.add_argument("--beta", type=float, default=1.25,
                       help="Spectral Edge Budgeting strength β (default 1.25)")
    group.add_argument("--s-d", dest="s_d", type=float, default=0.70,
                       help="SEB decay sparsity s_d: budgets fade to uniform as s → s_d (default 0.70)")
    group.add_argument("--tw", dest="tw_confidence", type=float, default=0.99,
                       choices=[0.0, 0.90, 0.95, 0.99],
                       help="Tracy–Widom confidence for counting spikes; 0 = count above plain σ+ (default 0.99)")
    group.add_argument("--spectrum", choices=["exact", "sketch"], default="exact",
                       help="exact (default): full Gram eigenvalues; sketch: σ² from a 1024-row sample + "
                            "randomized top-k, ~10× faster at 4096 but σ² off by up to tens of %% on trained "
                            "layers (README: Models bigger than the machine)")
    group.add_argument("--workers", choices=["local", "ray"], default="local",
                       help="where the per-weight fits run: local threads (default) or a Ray cluster "
                            "(pip install 'mpcompile[ray]')")
    group.add_argument("--ray-address", metavar="ADDR", default=None,
                       help="Ray cluster to run the fits on (e.g. ray://head:10001 or auto); implies --workers ray")


def analyze_options_from_args(args: argparse.Namespace) -> AnalyzeOptions:
    """The spectral options shared by ``analyze`` and ``compile``."""
    return AnalyzeOptions(
        alpha=args.alpha,
        beta=args.beta,
        s_d=args.s_d,
        tw_confidence=args.tw_confidence or None,
        annotate=True,
        spectrum=getattr(args, "spectrum", "exact"),
        workers="ray" if getattr(args, "ray_address", None) else getattr(args, "workers", "local"),
        ray_address=getattr(args, "ray_address", None),
    )


def add_force_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="replace existing output files (without it an existing output is an error)")
