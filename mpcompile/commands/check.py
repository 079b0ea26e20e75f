"""``mpcompile check``: independently verify the TensorRT 2:4 rule on a written model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mpcompile.report.console import stderr_console, stdout_console
from mpcompile.errors import EXIT_CHECK_FAILED
from mpcompile.report.json_report import dumps, report_header

__all__ = ["register", "run"]

EXAMPLES = """\
examples:
  mpcompile check model.sparse.onnx
  mpcompile check model.sparse.onnx --json > check.json

exit code 1 when a layer marked 2:4 (metadata mpcompile.sparsity=2:4) violates the rule.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check",
        help="verify, layer by layer, that weights marked 2:4 are TensorRT-legal",
        description=(
            "Re-read an ONNX file and check every GEMM/Conv weight against TensorRT's 2:4 rule "
            "(groups of 4 along the reduction axis: axis 0 of a MatMul W[K,N], axis 1 of a Gemm "
            "transB=1 B, input channels at each (kh,kw) of a Conv). Shares no code with the "
            "mask writer."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="ONNX model to check")
    parser.add_argument("--json", action="store_true", help="print the JSON result instead of a table")
    parser.add_argument("-o", "--output", metavar="CHECK.json", help="write the JSON result here")
    parser.add_argument("--force", action="store_true", help="replace an existing -o file")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mpcompile.checks.checker import check_model, render_check_table

    from mpcompile.io.outputs import RunOutputs, model_files

    outputs = RunOutputs(model_files(args.model) if Path(args.model).is_file() else [args.model], force=args.force)
    if args.output:
        outputs.add(args.output, "-o")  # refused before the check runs
    report = check_model(args.model)
    payload = report_header("check", None, model={"path": str(args.model)}, **report.to_dict())
    if args.json:
        sys.stdout.write(dumps(payload) + "\n")
    else:
        render_check_table(report, stdout_console())
    if args.output:
        with outputs:
            outputs.write_text(args.output, dumps(payload) + "\n")
            outputs.commit()
        stderr_console(args.quiet).print(f"report: {args.output}")
    return 0 if report.ok else EXIT_CHECK_FAILED
