"""``mpcompile build``: TensorRT engines dense vs 2:4, which layers really ran sparse, latency.

Without TensorRT or a GPU it says so in one line, writes the modeled A40/A100 report (every
figure labelled modeled) and exits with code 6, so a pipeline can tell "not measured here"
from a failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mpcompile.commands._args import add_shape_args, shape_spec_from_args, shape_specs_from_args
from mpcompile.report.console import stderr_console, stdout_console
from mpcompile.errors import EXIT_NO_BACKEND, UsageError
from mpcompile.report.figures import speedup_summary
from mpcompile.report.json_report import report_header, write_json

__all__ = ["register", "run"]

EXAMPLES = """\
examples:
  mpcompile build model.sparse.onnx --dense model.onnx --profile input:1x3x224x224,8x3x224x224,32x3x224x224
  mpcompile build model.sparse.onnx --shape input:8x3x224x224     # no TensorRT here: modeled report, exit 6

exit code 6 when TensorRT or a GPU is missing (the modeled report is still written);
exit code 5 when they are there but Polygraphy is not (pip install 'mpcompile[gpu]').
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "build",
        help="build dense and 2:4 TensorRT engines, verify sparse tactics, time them",
        description=(
            "Build a dense and a SPARSE_WEIGHTS TensorRT engine, read the engine inspector and the "
            "builder log to see which pruned layers TensorRT actually ran with sparse kernels, give "
            "dense weights back to those it did not (with --dense), and time both engines. "
            "Writes <model>.build.json with measured and modeled (A40/A100) speedups, each labelled."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="2:4 ONNX model written by mpcompile")
    parser.add_argument("--dense", metavar="DENSE.onnx", help="the dense original: reference engine and weights to revert")
    parser.add_argument("--profile", action="append", metavar="NAME:MIN,OPT,MAX",
                        help="optimization profile for a dynamic input (repeatable)")
    parser.add_argument("--no-revert", dest="revert", action="store_false",
                        help="keep pruned weights on layers TensorRT runs dense")
    parser.add_argument("--timing-cache", metavar="FILE", help="TensorRT timing cache to reuse")
    parser.add_argument("--iters", type=int, default=200, help="timed iterations (default 200)")
    parser.add_argument("-o", "--output", metavar="BUILD.json", help="report path (default MODEL.build.json)")
    add_shape_args(parser)
    parser.set_defaults(handler=run)


def _modeled(model_path: str, args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    """Modeled speedups at the precision the model stores (what TensorRT will build), one row
    per shape set and GPU."""
    from mpcompile.analyze import AnalyzeOptions, analyze_model
    from mpcompile.checks.checker import check_model
    from mpcompile.trt.speedup import model_precision, shape_set_speedups

    marked = {c.node for c in check_model(model_path).layers if c.marked}
    analysis = analyze_model(model_path, shape_spec_from_args(args), AnalyzeOptions(annotate=False))
    sparse = {a.name for a in analysis.result.layers if a.layer.node.name in marked}
    precision = model_precision(analysis.loaded.model)
    return shape_set_speedups(analysis, sparse, shape_specs_from_args(args), precision), sorted(marked)


def run(args: argparse.Namespace) -> int:
    from mpcompile.trt.gpu_probe import gpu_available

    err = stderr_console(args.quiet)
    from mpcompile.io.outputs import RunOutputs, model_files

    out = Path(args.output or str(Path(args.model).with_suffix("")) + ".build.json")
    guard = RunOutputs([*model_files(args.model), *(model_files(args.dense) if args.dense else [])], force=True)
    guard.add(out, "-o")  # never the model, the dense model or their data; refused before any work
    for path, what in _derived_outputs(Path(args.model), bool(args.dense)):
        guard.add(path, what)
    from mpcompile.trt.build_plan import parse_profile_spec

    for spec in args.profile or []:  # a bad --profile is a usage error on any machine, before any work
        parse_profile_spec(spec)
    modeled, marked = _modeled(args.model, args)
    ok, reason = gpu_available(require_tensorrt=True)
    report = report_header("build", Path(args.model), marked_layers=marked, speedup=modeled, measured=None)
    if not ok:
        report["measured"] = {"available": False, "reason": reason}
        write_json(report, out)
        for item in modeled:
            stdout_console().print(
                speedup_summary(item)
                + (f"; {item['fp16_speedup']:.2f}× if emitted as FP16 (mpcompile --fp16)" if "fp16_speedup" in item else ""),
                highlight=False, markup=False,
            )
        # one plain line on stderr (no markup, no wrapping): pipelines grep for it
        print(f"mpcompile: no measured build here: {reason}; modeled report written to {out}", file=sys.stderr)
        return EXIT_NO_BACKEND
    from mpcompile.trt.build_plan import import_polygraphy_trt

    import_polygraphy_trt()  # TensorRT and a GPU but no Polygraphy: one line, exit 5, nothing written
    report["measured"] = _measure(args, marked, err)
    write_json(report, out)
    err.print(f"build report: {out}")
    return 0


def _measure(args: argparse.Namespace, marked: list[str], err) -> dict[str, Any]:
    """Dense and sparse engines, sparse-tactic table, optional revert + rebuild, latency."""
    from mpcompile.trt.builder import BuildConfig, build_engine, parse_profile_spec, time_engine
    from mpcompile.trt.sparsity import onnx_node_index, sparsity_table

    model = Path(args.model)
    profiles = [parse_profile_spec(spec) for spec in args.profile or []]
    config = dict(profiles=profiles, timing_cache=args.timing_cache)
    sparse = build_engine(model, BuildConfig(sparse=True, **config), model.with_suffix(".sparse.engine"))
    table = sparsity_table(marked, sparse.engine, sparse.log, onnx_node_index(model))
    result: dict[str, Any] = {"available": True, "sparse_build": sparse.to_dict(), "layers": table.to_dict()}
    engines = {"sparse": sparse.engine_path}
    if args.dense:
        dense_path, result["precision"] = _dense_at_same_precision(model, Path(args.dense))
        dense = build_engine(dense_path, BuildConfig(sparse=False, **config), model.with_suffix(".dense.engine"))
        engines["dense"] = dense.engine_path
        result["dense_build"] = dense.to_dict()
        unpicked = table.pruned_but_dense
        if args.revert and unpicked:
            reverted, check = _revert(model, Path(args.dense), unpicked, args)
            rebuilt = build_engine(reverted, BuildConfig(sparse=True, **config), reverted.with_suffix(".engine"))
            engines["reverted"] = rebuilt.engine_path
            result["reverted"] = {"model": str(reverted), **check.to_dict()}
            err.print(f"{len(check.layers)} pruned layers ran dense in TensorRT: dense weights restored in "
                      f"{reverted} (output drift vs dense {check.sparse_drift:.3g} -> {check.drift:.3g}, ONNX Runtime)")
    inputs = _engine_inputs(args)
    result["latency"] = {
        name: {**time_engine(path, inputs, iters=args.iters).to_dict(), "kind": "measured"}
        for name, path in engines.items()
    }
    if "dense" in result["latency"]:
        dense_ms = result["latency"]["dense"]["median_ms"]
        result["speedup"] = {k: dense_ms / v["median_ms"] for k, v in result["latency"].items() if k != "dense"}
    return result


def _derived_outputs(model: Path, dense: bool) -> list[tuple[Path, str]]:
    """The files a measured build writes beside the model, named so the guard can refuse them
    (as it refuses ``-o``) when one would replace an input or another output."""
    paths = [(model.with_suffix(".sparse.engine"), "the sparse engine")]
    if dense:
        reverted = _reverted_path(model)
        paths += [(model.with_suffix(".dense.engine"), "the dense engine"),
                  (reverted, "the reverted model"), (reverted.with_suffix(".engine"), "the reverted engine")]
    return paths


def _reverted_path(model: Path) -> Path:
    return model.with_name(model.stem + ".reverted.onnx")


def _revert(model: Path, dense: Path, nodes: list[str], args: argparse.Namespace):
    """Dense weights back for ``nodes``, in the permuted frame and stored dtype, validated with
    ONNX Runtime against the dense model before anything is written (``mpcompile.revert``)."""
    from mpcompile.revert import revert_dense_weights

    out = _reverted_path(model)
    return out, revert_dense_weights(model, dense, nodes, out, spec=shape_spec_from_args(args))


def _dense_at_same_precision(model: Path, dense: Path) -> tuple[Path, dict[str, str]]:
    """The dense reference at the sparse model's precision, so the measured ratio is the 2:4
    gain and not FP32→FP16: an FP32 original of an ``--fp16`` model gets the same FP16 pass."""
    from mpcompile.io.model_io import load_model, save_model
    from mpcompile.trt.speedup import model_precision

    sparse_prec = model_precision(load_model(model).model)
    loaded = load_model(dense).model
    dense_prec = model_precision(loaded)
    info = {"sparse": sparse_prec, "dense": dense_prec, "dense_engine": dense_prec}
    if sparse_prec == dense_prec:
        return dense, info
    if sparse_prec != "fp16" or dense_prec != "fp32":
        raise UsageError(f"--dense {dense.name} is {dense_prec.upper()} but {model.name} is {sparse_prec.upper()}: "
                         "give a dense model at the same precision")
    from mpcompile.passes.fp16 import ConvertToFloat16Pass

    ConvertToFloat16Pass()(loaded)
    out = save_model(loaded, model.with_name(model.stem + ".dense-fp16.onnx"), protect=(model, dense))
    info["dense_engine"] = "fp16"
    return out, info


def _engine_inputs(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Legal timing inputs at the given shapes: the generator calibration uses (token ids below
    the embedding table's rows, masks of ones, N(0,1) floats), not N(0,1) for every input."""
    from mpcompile.io.calibration import synthetic_inputs
    from mpcompile.io.model_io import load_model

    spec = shape_spec_from_args(args)
    model = load_model(args.model).model
    first = model.graph.inputs[0] if model.graph.inputs else None
    batch = 1
    if first is not None and first.name in spec.inputs and spec.inputs[first.name]:
        batch = spec.inputs[first.name][0]
    elif first is not None and first.shape is not None and len(first.shape):
        dim = first.shape[0]
        batch = dim if isinstance(dim, int) else spec.dims.get(str(dim), spec.default)
    return synthetic_inputs(model, spec, samples=max(1, batch)).inputs
