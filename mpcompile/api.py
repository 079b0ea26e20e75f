"""Python API for deployment pipelines: ``mpcompile.compile(model, example_inputs=None, **options)``.

Why one entry point that takes anything: pipelines hold a model in whatever form the
previous step produced (a path, an ``onnx.ModelProto``, an ``onnx_ir`` model, a
``torch.nn.Module``, a ``torch.export.ExportedProgram`` or a saved ``.pt2``). Everything is
turned into an ONNX file in a work folder and goes through exactly the passes the CLI runs,
so API and CLI results are the same numbers.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from mpcompile.errors import OptionalDependencyError, UsageError
from mpcompile.pipeline import CompileOptions, CompileResult, compile_model

__all__ = ["compile", "to_onnx_path", "apply_masks_to_torch"]


def _require_torch(purpose: str):
    try:
        import torch
    except ModuleNotFoundError as exc:
        raise OptionalDependencyError("torch", "torch", purpose) from exc
    return torch


def _export_torch(module_or_program: Any, example_inputs: Any, path: Path) -> Path:
    torch = _require_torch("exporting a torch model")
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
            torch = _require_torch("loading a .pt2 program")
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


def compile(  # noqa: A001 - the public name pipelines expect
    model: Any,
    example_inputs: Any = None,
    *,
    work_dir: str | os.PathLike | None = None,
    **options: Any,
) -> CompileResult:
    """Compile ``model`` to 2:4 sparsity; keyword options are :class:`CompileOptions` fields.

    Returns the :class:`~mpcompile.pipeline.CompileResult` (``output_path``, per-layer
    ``selection.decisions``, ``validation``, ``to_dict()`` for the JSON report).
    """
    unknown = set(options) - set(CompileOptions.__dataclass_fields__)
    if unknown:
        raise UsageError(f"unknown option(s) {sorted(unknown)}; see mpcompile.pipeline.CompileOptions")
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    path = to_onnx_path(model, example_inputs, work_dir)
    if "output" not in options and work_dir is not None:
        options["output"] = str(Path(work_dir) / f"{path.stem}.sparse.onnx")
    return compile_model(path, CompileOptions(**options))


def apply_masks_to_torch(module: Any, result: CompileResult) -> dict[str, Any]:
    """Copy the 2:4 zero pattern of ``result`` onto a torch module's Linear/Conv weights.

    Layers are matched by weight values up to a positive per-row scale (the exporters fold
    eval-mode BatchNorm into conv weights), so this works for modules exported by either
    exporter. Permutations change the weight order: compile with ``permute=False`` for
    fine-tuning. Returns ``{parameter name: bool mask tensor}`` for frozen-mask training.
    """
    _require_torch("applying masks to a torch module")
    from mpcompile.finetune import apply_masks, masks_from_compile

    masks = masks_from_compile(module, result)
    apply_masks(module, masks)
    return masks
