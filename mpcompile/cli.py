"""The ``mpcompile`` command line: subcommands over the library, one-line errors.

``mpcompile model.onnx`` is short for ``mpcompile compile model.onnx``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence

import mpcompile
from mpcompile.errors import MpcompileError

__all__ = ["main", "build_parser"]

EXIT_INTERNAL = 70
_DESCRIPTION = """\
mpcompile: spectrum-guided NVIDIA 2:4 structured sparsity for exported models.

It measures the Marchenko–Pastur spectrum of every GEMM/Conv weight, decides which layers
can lose half their weights, rewrites them into TensorRT-legal 2:4 sparsity (with channel
permutations folded into the graph), checks the result independently and reports what it
cost in accuracy and what it buys in latency."""

_EPILOG = """\
examples:
  mpcompile demo                       # everything on a bundled model, no arguments
  mpcompile model.onnx                 # = mpcompile compile model.onnx -> model.sparse.onnx
  mpcompile analyze model.onnx         # spectral table only
  mpcompile check model.sparse.onnx    # is every layer marked 2:4 TensorRT-legal?

exit codes: 0 ok, 1 check failed, 2 usage, 3 bad input, 4 unsupported model,
            5 missing optional dependency, 6 no GPU/TensorRT for a measured stage, 70 internal error
"""


def _subcommand_modules():
    from mpcompile.commands import analyze, check, demo

    modules = [analyze, check, demo]
    for optional in ("compile", "build", "limit", "finetune"):
        try:
            modules.append(__import__(f"mpcompile.commands.{optional}", fromlist=["register"]))
        except ModuleNotFoundError as exc:
            if exc.name != f"mpcompile.commands.{optional}":
                raise
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpcompile",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mpcompile {mpcompile.__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or status lines")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _subcommand_modules():
        module.register(subparsers)
    return parser


_GLOBAL_FLAGS = ("-q", "--quiet", "--debug")


def _normalise_argv(argv: list[str], commands: set[str]) -> list[str]:
    """Accept -q/--debug anywhere, and insert ``compile`` when the first positional is a model."""
    flags = [a for a in argv if a in _GLOBAL_FLAGS]
    argv = flags + [a for a in argv if a not in _GLOBAL_FLAGS]
    for index, arg in enumerate(argv):
        if arg.startswith("-"):
            continue
        if arg not in commands and "compile" in commands:
            return [*argv[:index], "compile", *argv[index:]]
        return argv
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    args = parser.parse_args(_normalise_argv(args_list, commands))
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="mpcompile: %(levelname)s: %(message)s",
    )
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except MpcompileError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"mpcompile: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("mpcompile: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line unless --debug
        if args.debug:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(
            f"mpcompile: internal error: {type(exc).__name__}: {first} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
