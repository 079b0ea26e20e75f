"""User-facing errors: one line that names the problem, and a distinct exit code.

The CLI prints ``str(error)`` and exits with ``error.exit_code``; a traceback is shown only
with ``--debug``. Library code raises these instead of returning sentinels so that a
deployment pipeline calling the Python API sees the same message a shell user does.
"""

from __future__ import annotations

__all__ = [
    "MpcompileError",
    "InvalidModelError",
    "ExternalDataError",
    "UnsupportedModelError",
    "NoGemmError",
    "OptionalDependencyError",
    "BackendUnavailableError",
    "UsageError",
]

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_UNSUPPORTED = 4
EXIT_MISSING_DEPENDENCY = 5
EXIT_NO_BACKEND = 6


class MpcompileError(Exception):
    """Base of every error mpcompile reports to a user as one line."""

    exit_code: int = EXIT_BAD_INPUT


class UsageError(MpcompileError):
    """The command line or API options are inconsistent."""

    exit_code = EXIT_USAGE


class InvalidModelError(MpcompileError):
    """The input is not a readable, valid ONNX model."""

    exit_code = EXIT_BAD_INPUT


class ExternalDataError(MpcompileError):
    """External tensor data is missing, truncated, or points outside the model's folder."""

    exit_code = EXIT_BAD_INPUT


class UnsupportedModelError(MpcompileError):
    """The model is valid but uses something mpcompile cannot handle (dtype, op, layout)."""

    exit_code = EXIT_UNSUPPORTED


class NoGemmError(UnsupportedModelError):
    """The model has no MatMul/Gemm with a constant weight and no Conv: nothing to analyze."""


class OptionalDependencyError(MpcompileError):
    """An optional extra (torch, tensorrt, matplotlib) is needed for this command."""

    exit_code = EXIT_MISSING_DEPENDENCY

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the optional package '{package}': "
            f"pip install 'mpcompile[{extra}]'"
        )
        self.package = package
        self.extra = extra


class BackendUnavailableError(MpcompileError):
    """No GPU / TensorRT on this machine: the measured stage cannot run here."""

    exit_code = EXIT_NO_BACKEND
