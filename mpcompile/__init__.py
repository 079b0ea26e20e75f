"""mpcompile: spectrum-guided NVIDIA 2:4 sparsity for exported models.

``mpcompile.compile(model, example_inputs=None, **options)`` is the Python API; the CLI is
``mpcompile``. Heavy modules load on first use so ``import mpcompile`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "compile", "compile_model", "CompileOptions", "analyze_model"]

_LAZY = {
    "compile": ("mpcompile.api", "compile"),
    "compile_model": ("mpcompile.pipeline", "compile_model"),
    "CompileOptions": ("mpcompile.pipeline", "CompileOptions"),
    "analyze_model": ("mpcompile.analyze", "analyze_model"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'mpcompile' has no attribute {name!r}")
