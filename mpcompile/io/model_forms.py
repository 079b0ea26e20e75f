"""Any model form a pipeline holds (path, ``onnx.ModelProto``, ``onnx_ir.Model``, torch module,
``ExportedProgram``, ``.pt2``) turned into an ONNX file the compile can load.

Why its own module: both the public API and the fine-tuning driver need it; kept in
``api.py`` it made ``api`` and ``finetune`` import each other.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from mpcompile.errors import OptionalDependencyError, UsageError

__all__ = ["to_onnx_path", "require_torch"]


def require_torch(purpose: str):
    try:
        import torch
    except ModuleNotFoundError as exc:
        raise OptionalDependencyError("torch", "torch", purpose) from exc
    return torch


def _export_torch(module_or_program: Any, example_inputs: Any, path: Path) -> Path:
    torch = require_torch("exporting a torch model")
    if isinstance(module_or_program, torch.export.ExportedProgram):
        program = module_or_program
        onnx_program = torch.onnx.export(program, dynamo=True)
    else:
        if example_inputs is None:
            raise UsageError("a torch.nn.Module needs example_inputs (a tensor or a tuple of tensors)")
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        module_or_program.eval()
        onnx_program = torch.onnx.export(module_or_program, args, dynamo=True)
    onnx_program.save(str(path))
    return path


def to_onnx_path(model: Any, example_inputs: Any = None, work_dir: str | os.PathLike | None = None) -> Path:
    """Turn any supported model form into an ONNX file path (a new file unless given a path)."""
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if path.suffix in (".pt2",):
            torch = require_torch("loading a .pt2 program")
            program = torch.export.load(str(path))  # ExportedProgram archives hold no pickled code
            return _export_torch(program, None, _work_file(work_dir, path.stem))
        if path.suffix == ".pt":
            raise UsageError(
                f"{path}: a .pt file needs its nn.Module class; load it (torch.load(..., weights_only=True) "
                "into your module) and pass the module with example_inputs"
            )
        return path
    if isinstance(model, onnx.ModelProto):
        out = _work_file(work_dir, "model")
        onnx.save(model, out)
        return out
    if isinstance(model, ir.Model):
        out = _work_file(work_dir, "model")
        ir.save(model, out)
        return out
    torch_mod = _maybe_torch()
    if torch_mod is not None and isinstance(model, (torch_mod.nn.Module, torch_mod.export.ExportedProgram)):
        return _export_torch(model, example_inputs, _work_file(work_dir, type(model).__name__.lower()))
    raise UsageError(
        f"unsupported model type {type(model).__name__}: give an ONNX path, onnx.ModelProto, onnx_ir.Model, "
        "torch.nn.Module (with example_inputs), torch.export.ExportedProgram or a .pt2 path"
    )


def _maybe_torch():
    try:
        import torch
    except ModuleNotFoundError:
        return None
    return torch


def _work_file(work_dir: str | os.PathLike | None, stem: str) -> Path:
    folder = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="mpcompile-"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{stem}.onnx"
