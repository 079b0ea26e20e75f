"""Python API for deployment pipelines: ``mpcompile.compile(model, example_inputs=None, **options)``.

Why one entry point that takes anything: pipelines hold a model in whatever form the
previous step produced (a path, an ``onnx.ModelProto``, an ``onnx_ir`` model, a
``torch.nn.Module``, a ``torch.export.ExportedProgram`` or a saved ``.pt2``). Everything is
turned into an ONNX file in a work folder and goes through exactly the passes the CLI runs,
so API and CLI results are the same numbers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mpcompile.errors import UsageError
from mpcompile.io.model_forms import require_torch, to_onnx_path
from mpcompile.pipeline import CompileOptions, CompileResult, compile_model

__all__ = ["compile", "to_onnx_path", "apply_masks_to_torch"]


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


def apply_masks_to_torch(module: Any, result: CompileResult, *, load_weights: bool = False) -> dict[str, Any]:
    """Copy the 2:4 zero pattern of ``result`` onto a torch module's Linear/Conv weights.

    ``load_weights=True`` copies the compiled sparse weights instead of only zeroing: the
    data-aware methods (cast-obs, sparsegpt, admm) also update the weights they keep, and a
    fine-tune should start from that one-shot model.

    Layers are matched by weight values up to a positive per-row scale (the exporters fold
    eval-mode BatchNorm into conv weights), so this works for modules exported by either
    exporter. Permutations change the weight order: compile with ``permute=False`` for
    fine-tuning. Returns ``{parameter name: bool mask tensor}`` for frozen-mask training.
    """
    require_torch("applying masks to a torch module")
    from mpcompile.finetune import apply_masks, masks_from_compile

    masks = masks_from_compile(module, result, load_weights=load_weights)
    apply_masks(module, masks)
    return masks
