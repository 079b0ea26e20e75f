"""``mpcompile finetune``: 2:4 one-shot, then frozen-mask distillation from the dense model, then ONNX."""

from __future__ import annotations

import argparse
import sys

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mpcompile.report.console import stderr_console, stdout_console
from mpcompile.errors import EXIT_CHECK_FAILED, OptionalDependencyError
from mpcompile.report.json_report import dumps, report_header, write_json

__all__ = ["register", "run"]

EXAMPLES = """\
examples:
  mpcompile finetune --bundled digits_cnn                        # magnitude 2:4, 5 epochs -> digits_cnn.finetuned.onnx
  mpcompile finetune --bundled digits_vit --method cast --epochs 10 -o vit.ft.onnx

loss: (1−α)·CE + α·τ²·KL(softmax(z_T/τ) ‖ softmax(z_S/τ)), teacher = the dense model; AdamW with a
cosine schedule; masked weights are re-zeroed after every optimiser step. The exported ONNX marks
its 2:4 nodes (mpcompile.sparsity=2:4) and is re-checked with `mpcompile check`'s checker.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="recover accuracy after 2:4 with frozen-mask distillation (bundled models; needs torch)",
        description=(
            "Compile a bundled model to 2:4 without permutation, copy the masks onto its torch module, "
            "distil from the dense model on the train split with the masks frozen, export ONNX and "
            "check it. Reports test accuracy dense, after one-shot 2:4, and after fine-tuning. "
            "From Python, mpcompile.finetune.finetune() takes any module, data and masks."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--bundled", metavar="NAME", required=True,
                        help="bundled model: digits_cnn, digits_vit or digits_mlp")
    parser.add_argument("--method", default="magnitude",
                        help="2:4 mask method of the one-shot step (default magnitude; cast/cast-obs/wanda/"
                             "sparsegpt calibrate on the calib split)")
    parser.add_argument("--epochs", type=int, default=5, help="distillation epochs (default 5)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    parser.add_argument("--alpha", type=float, default=0.5, help="KD weight α (default 0.5)")
    parser.add_argument("--tau", type=float, default=2.0, help="KD temperature τ (default 2)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", metavar="OUT.onnx", help="default: NAME.finetuned.onnx")
    parser.add_argument("--report", metavar="REPORT.json", help="write the JSON report here")
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of a summary")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        from mpcompile.finetune import FinetuneOptions, finetune_bundled
    except ModuleNotFoundError as exc:
        raise OptionalDependencyError("torch", "torch", "fine-tuning") from exc
    from mpcompile.zoo.bundled import check_bundled_name

    check_bundled_name(args.bundled)
    from mpcompile.io.outputs import RunOutputs

    guard = RunOutputs(force=True)  # -o and --report: distinct files in existing folders, checked first
    for path, option in ((args.output, "-o"), (args.report, "--report")):
        if path:
            guard.add(path, option)
    options = FinetuneOptions(epochs=args.epochs, lr=args.lr, alpha=args.alpha, tau=args.tau,
                              batch_size=args.batch_size, seed=args.seed)
    err = stderr_console(quiet=args.quiet)
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True, disable=args.quiet or args.json) as progress:
        task = progress.add_task("distilling", total=None, loss="–")

        def advance(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, total=total, loss=f"{loss:.4f}")

        result = finetune_bundled(args.bundled, method=args.method, output=args.output, options=options,
                                  progress=advance)
    report = report_header("finetune", None, **result.to_dict())
    if args.json:
        sys.stdout.write(dumps(report) + "\n")
    else:
        out = stdout_console()
        out.print(f"{args.bundled}: test accuracy dense {result.dense_accuracy:.4f} → 2:4 one-shot "
                  f"({result.method}) {result.oneshot_accuracy:.4f} → fine-tuned {result.finetuned_accuracy:.4f} "
                  f"({args.epochs} epochs; ONNX {result.onnx_accuracy:.4f})")
        verdict = "[green]passed[/]" if result.check_ok else "[red]FAILED[/]"
        out.print(f"wrote {result.output}: {len(result.marked_nodes)} nodes marked 2:4, check {verdict}; "
                  f"masked weights non-zero after training: {result.masked_nonzeros}")
    if args.report:
        err.print(f"report: {write_json(report, args.report)}")
    return 0 if result.check_ok else EXIT_CHECK_FAILED
