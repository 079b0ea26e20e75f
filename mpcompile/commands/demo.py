"""``mpcompile demo``: the whole pipeline on a model bundled with the package, no arguments."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from mpcompile.report.console import stderr_console

__all__ = ["register", "run"]

BUNDLED = ("digits_cnn", "digits_vit", "digits_mlp")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run mpcompile end to end on a bundled model (trained on sklearn digits)",
        description=(
            "Run the pipeline on a small real model shipped with mpcompile (a CNN or a tiny ViT "
            "trained on sklearn's digits, with its held-out test split), writing results to a "
            "fresh folder. Needs no download and no argument."
        ),
    )
    parser.add_argument("--model", choices=BUNDLED, default="digits_cnn", help="bundled model (default digits_cnn)")
    parser.add_argument("--out-dir", metavar="DIR", help="where to write outputs (default: a new temp folder)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mpcompile.zoo.bundled import bundled_model_path

    err = stderr_console(args.quiet)
    source = bundled_model_path(args.model)
    out_dir = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="mpcompile-demo-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    err.print(f"[bold]mpcompile demo[/] on bundled model {args.model} ({source.name}); outputs in {out_dir}")
    return _run_pipeline(args, source, out_dir)


def _run_pipeline(args: argparse.Namespace, source: Path, out_dir: Path) -> int:
    """Copy the bundled model into ``out_dir`` and run the full compile on it with its data."""
    import shutil

    from mpcompile.commands import compile as compile_cmd
    from mpcompile.zoo.bundled import write_split_npz

    model = out_dir / source.name
    shutil.copyfile(source, model)
    calib = write_split_npz("calib", out_dir / "calib.npz", model=args.model)
    test = write_split_npz("test", out_dir / "test.npz", model=args.model)
    parser = argparse.ArgumentParser(add_help=False)
    subparsers = parser.add_subparsers()
    compile_cmd.register(subparsers)
    ns = parser.parse_args(["compile", str(model), "--calib", str(calib), "--eval", str(test), "--force"])
    ns.quiet = args.quiet
    return compile_cmd.run(ns)
