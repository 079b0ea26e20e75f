"""``mpcompile compile`` (also plain ``mpcompile model.onnx``): the whole 2:4 pipeline."""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from rich.table import Table

from mpcompile.commands._args import (
    add_force_arg,
    add_shape_args,
    add_spectral_args,
    analyze_options_from_args,
    shape_spec_from_args,
    shape_specs_from_args,
)
from mpcompile.report.console import progress_callback, stderr_console, stdout_console
from mpcompile.errors import EXIT_CHECK_FAILED
from mpcompile.numerics.masks import MASK_METHODS
from mpcompile.passes.unstructured_prune import UNSTRUCTURED_METHODS
from mpcompile.stages.options import CALIBRATION_PROTOCOLS
from mpcompile.pipeline import CompileOptions, CompileResult, compile_model
from mpcompile.io.model_io import default_output_path
from mpcompile.io.outputs import RunOutputs, protected_files
from mpcompile.report.figures import (calibration_protocol_summary, choice_summary, macs_cell, selection_summary,
                                      speedup_summary)
from mpcompile.report.json_report import dumps
from mpcompile.selection.orders import ORDERS

__all__ = ["register", "run", "options_from_args", "render_compile_summary"]

EXAMPLES = """\
examples:
  mpcompile model.onnx                                  # -> model.sparse.onnx + model.sparse.report.json
  mpcompile model.onnx --calib calib.npz --method cast  # CAST masks from 256 calibration samples
  mpcompile model.onnx --target 0.5 -o half.onnx        # 2:4 on half of the eligible GEMM MACs, MP-ranked
  mpcompile model.onnx --no-permute --method magnitude  # plain magnitude 2:4 (the ASP/ModelOpt baseline)

calibration file: an .npz with one array per model input, named like the input (first axis =
samples), optionally 'labels' (int) for accuracy; or a folder of <input>.npy files.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compile",
        help="analyze, choose layers, permute, mask 2:4, check and validate (the default command)",
        description=(
            "Rewrite a model's GEMMs and convolutions into TensorRT-legal 2:4 sparsity: MP spectral "
            "analysis ranks the layers, channel permutations are searched and folded into the "
            "producers, masks are chosen (CAST with calibration data, magnitude without), the "
            "written file is re-checked independently and compared with the dense model in ONNX "
            "Runtime. The input is never modified."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="ONNX model, or a torch.export archive (.pt2)")
    parser.add_argument("-o", "--output", metavar="OUT.onnx", help="output model (default: MODEL.sparse.onnx)")
    parser.add_argument("--report", metavar="REPORT.json",
                        help="JSON report (default: OUT.report.json; .md and .html beside it)")
    add_force_arg(parser)
    parser.add_argument("--json", action="store_true", help="print the JSON report to stdout")
    group = parser.add_argument_group("sparsity")
    group.add_argument("--method", choices=sorted([*MASK_METHODS, *UNSTRUCTURED_METHODS]),
                       help="mask method (default: cast-obs with --calib, magnitude without; admm: ADMM + exact "
                            "least-squares re-fit, slower, lower layer error); rmt-sv and "
                            "spectral-sample are the seed papers' unstructured methods (no 2:4 speedup)")
    group.add_argument("--sparsity", type=float, default=0.5,
                       help="removed fraction for the unstructured methods (default 0.5)")
    group.add_argument("--target", type=float, default=1.0,
                       help="fraction of eligible GEMM MACs to make 2:4, first layers of --order first (default 1.0)")
    group.add_argument("--max-drift", type=float, metavar="FRACTION",
                       help="instead of --target: an accuracy budget, the relative L2 output drift on calibration "
                            "data. With --calib (default --order choice): the layers giving the most modeled "
                            "gain (--gpu) or MACs within it, measured with interactions; with another --order "
                            "(or no --calib): the longest prefix of that order within it")
    group.add_argument("--order", choices=ORDERS, default=None,
                       help="layer order for --target and --max-drift: mp (spectral budget, predicted), "
                            "drift (measured: each layer made 2:4 alone on calibration data, lowest output "
                            "drift per MAC first; one ONNX Runtime pass per layer), graph, macs, choice "
                            "(--max-drift only: greedy by gain / measured drift increase, MP rank breaking "
                            "near-ties). Default: choice with --max-drift and --calib, else mp")
    group.add_argument("--gpu", metavar="GPU",
                       help="with --max-drift: weigh each layer by the modeled time it saves on this GPU "
                            "(A40, A100-SXM4-80GB, H100-SXM, ...: FP16 roofline, layers predicted to run "
                            "dense gain nothing) instead of by its MACs")
    group.add_argument("--only-profitable", metavar="GPU",
                       help="keep dense every layer the modeled predictor says TensorRT would run dense on GPU "
                            "(e.g. A100-SXM4-80GB, A40): too few channels, misaligned, or memory bound at the "
                            "analysed shapes; the report gives each reason")
    group.add_argument("--exclude", action="append", default=[], metavar="LAYER",
                       help="keep this layer dense (repeatable; names as printed by analyze)")
    group.add_argument("--no-permute", dest="permute", action="store_false",
                       help="skip the input-channel permutation search")
    group.add_argument("--allow-gather", action="store_true",
                       help="where a permutation cannot be folded, insert an explicit Gather (reported)")
    group.add_argument("--perm-time", type=float, default=0.5, metavar="SECONDS",
                       help="permutation search budget per layer (default 0.5 s)")
    group.add_argument("--perm-steps", type=int, default=None, metavar="N",
                       help="stop each permutation search after N steps instead of --perm-time: the same "
                            "model and options then give the same output on any machine (e.g. 60)")
    group.add_argument("--conv", choices=("native", "im2col"), default="native",
                       help="native: 2:4 conv weights; im2col: lower selected convs to unfold+MatMul")
    group.add_argument("--fp16", action="store_true", help="emit FP16 weights and compute (LayerNorm/Softmax kept FP32)")
    data = parser.add_argument_group("data")
    data.add_argument("--calib", metavar="DATA", help="calibration inputs (.npz or folder of .npy)")
    data.add_argument("--eval", dest="eval_data", metavar="DATA",
                      help="evaluation inputs (+ labels) for the dense-vs-sparse comparison (default: calibration data)")
    data.add_argument("--calibration", choices=CALIBRATION_PROTOCOLS, default="sequential",
                      help="sequential: layers are calibrated depth group by depth group, each on the model with "
                           "the earlier groups already 2:4, as the SparseGPT/Wanda reference code does (one capture "
                           "pass per group, e.g. 4 per transformer block); dense: one capture over the dense model "
                           "(faster, usually less accurate) (default sequential)")
    data.add_argument("--calib-samples", type=int, default=256, help="use at most this many calibration samples")
    data.add_argument("--batch-size", type=int, default=8,
                      help="ONNX Runtime batch size (default 8: bounds activation memory on big models)")
    data.add_argument("--seed", type=int, default=0, help="seed for synthetic data, row sampling and search")
    add_shape_args(parser)
    add_spectral_args(parser)
    parser.set_defaults(handler=run)


def options_from_args(args: argparse.Namespace) -> CompileOptions:
    return CompileOptions(
        method=args.method,
        permute=args.permute,
        allow_gather=args.allow_gather,
        perm_time_budget=args.perm_time,
        perm_steps=args.perm_steps,
        target=args.target,
        max_drift=args.max_drift,
        sparsity=args.sparsity,
        order=args.order,
        gpu=args.gpu,
        exclude=tuple(args.exclude),
        only_profitable=args.only_profitable,
        calib=args.calib,
        eval_data=args.eval_data,
        calib_samples=args.calib_samples,
        calibration=args.calibration,
        batch_size=args.batch_size,
        conv=args.conv,
        fp16=args.fp16,
        output=args.output,
        seed=args.seed,
        keep_dense=False,
        analyze=analyze_options_from_args(args),
        shape_spec=shape_spec_from_args(args),
        speedup_shape_specs=shape_specs_from_args(args),
    )


def render_compile_summary(result: CompileResult, console) -> None:
    table = Table(title=f"2:4 decisions — {result.input_path.name} → {result.output_path.name}", title_justify="left")
    for column in ("layer", "op", "out×K", "MACs", "2:4", "why", "kept |W|", "spec. err"):
        table.add_column(column, overflow="fold")
    masks = {m.layer: m for m in result.masks}
    spectra = result.spectra()
    for decision, analysis in zip(result.selection.decisions, result.analysis.result.layers):
        layer = analysis.layer
        mask = masks.get(decision.name)
        spectral = f"{spectra[mask.layer]['relative_spectral_error']:.3f}" if mask is not None else ""
        table.add_row(
            layer.name, layer.op_type, f"{layer.out_features}×{layer.reduction}", macs_cell(decision.reported_macs),
            "[green]2:4[/]" if decision.sparse else "dense", decision.reason,
            f"{mask.kept_magnitude_fraction:.3f}" if mask else "", spectral,
        )
    console.print(table)
    sel = result.selection
    summary = selection_summary({**sel.macs_report(), "sparse_layers": len(sel.selected_names)})
    console.print(f"method {result.method}; {summary}; calibration: {result.calibration_source}")
    protocol = {"protocol": result.calibration_protocol, "capture_passes": result.capture_passes}
    console.print(f"calibration protocol: {calibration_protocol_summary(protocol)}")
    if sel.choice is not None:
        console.print(choice_summary(sel.choice), markup=False, highlight=False)
    folded = [p for p in result.permutations if p.folded]
    if result.permutations:
        console.print(
            f"permutations: {len(folded)} folded into producers, "
            f"{sum(p.gather_inserted for p in result.permutations)} with explicit Gather, "
            f"{len(result.permutations) - len(folded)} skipped"
            + "".join(f"\n  skipped {', '.join(p.layers)}: {p.reason}" for p in result.permutations
                      if not p.folded and not p.gather_inserted)
        )
    check = "[green]passed[/]" if result.check_ok else "[red]FAILED[/]"
    console.print(f"independent 2:4 check: {check}")
    v = result.validation
    for c in v.all_outputs if v is not None else []:
        name = f" output '{c.output}'" if len(v.all_outputs) > 1 else ""
        line = f"dense vs sparse{name} on {c.samples} samples ({result.eval_source}): "
        if c.degenerate:  # a cosine of rounding noise would read as a result
            console.print(line + f"not meaningful, {c.degenerate} (max |Δ| {c.max_abs_error:.3g})")
            continue
        line += (f"cosine {c.cosine_similarity:.4f}, relative L2 drift {c.relative_l2:.4f}, "
                 f"max |Δ| {c.max_abs_error:.3g}")
        if c.top1_agreement is not None:
            line += f", top-1 agreement {100 * c.top1_agreement:.1f}%, certified unchanged {c.certified}/{c.samples}"
        if c.dense_accuracy is not None:
            line += f", accuracy {100 * c.dense_accuracy:.2f}% → {100 * c.sparse_accuracy:.2f}%"
        console.print(line)
    for item in result.speedup:
        console.print(f"speedup on {speedup_summary(item)}", markup=False, highlight=False)
    for note in result.notes:
        console.print(f"note: {note}", style="dim")


def run(args: argparse.Namespace) -> int:
    """Model, JSON, Markdown and HTML reports are one run: all staged, committed together only
    when the independent check passes (see :mod:`mpcompile.io.outputs`)."""
    from mpcompile.commands._inputs import onnx_input

    err = stderr_console(args.quiet)
    options = options_from_args(args)
    source = args.model
    out_path = args.output or str(default_output_path(Path(source).resolve(), "sparse"))
    inputs = protected_files(source) if Path(source).is_file() else [source]
    with RunOutputs([*inputs, args.calib, args.eval_data], force=args.force) as outputs:
        options.output = str(outputs.add(out_path, "-o"))
        report_path = args.report or str(Path(options.output).with_suffix("")) + ".report.json"
        stem = report_path[: -len(".json")] if report_path.endswith(".json") else report_path
        report_path = str(outputs.add(report_path, "--report"))
        outputs.add(f"{stem}.md", "--report (Markdown)")
        outputs.add(f"{stem}.html", "--report (HTML)")
        with onnx_input(source) as model_path:
            result = compile_model(model_path, options, progress=factory_for(args, err), outputs=outputs)
            report = result.to_dict()  # reads the (possibly exported, temporary) input
        if model_path != source:
            report["model"]["exported_from"] = str(Path(source).resolve())
        outputs.write_text(report_path, dumps(report) + "\n")
        staged_stem = str(outputs.stage_path(f"{stem}.md"))[: -len(".md")]
        outputs.stage_path(f"{stem}.html")
        extra = _write_human_reports(report, staged_stem, stem, result, err)
        if result.check_ok:
            outputs.commit()
    if args.json:
        sys.stdout.write(dumps(report) + "\n")
    else:
        render_compile_summary(result, stdout_console())
    if not result.check_ok:
        print(f"mpcompile: error: the independent 2:4 check failed on {len(result.check.failures)} layers; "
              f"nothing written to {result.output_path} or its reports", file=sys.stderr)
        return EXIT_CHECK_FAILED
    err.print(f"sparse model: {result.output_path}\nreport: {report_path}{extra}")
    return 0


def factory_for(args: argparse.Namespace, err):
    return partial(_progress, err, enabled=not args.json and not args.quiet)


def _write_human_reports(report, staged_stem: str, stem: str, result: CompileResult, err) -> str:
    """Markdown always; HTML with plots (matplotlib is a core dependency; a broken install
    still gets the Markdown and a hint whose ``[extra]`` survives rich markup)."""
    from rich.markup import escape

    from mpcompile.errors import OptionalDependencyError
    from mpcompile.report.html import render_markdown, write_reports
    from mpcompile.report.json_report import write_text

    try:
        write_reports(report, staged_stem, result.analysis.result.layers)
        return f", {stem}.md, {stem}.html"
    except OptionalDependencyError as exc:
        write_text(render_markdown(report), f"{staged_stem}.md")
        err.print(f"note: no HTML report: {escape(str(exc))}")
        return f", {stem}.md"


def _progress(console, description: str, total: int, *, enabled: bool):
    return progress_callback(console, description, total, enabled=enabled)
