"""Checks of user-supplied names and arrays against the model, before any work.

Why a module of its own: each of these mistakes used to surface deep in a stage as an
``internal error`` (exit 70) or, worse, be silently ignored (an ``--exclude`` typo kept no
layer dense). Each check raises a one-line :class:`~mpcompile.errors.UsageError` that names
the option, what was expected and what was given.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from mpcompile.errors import UsageError

__all__ = ["check_dim_names", "check_layer_names", "check_input_arrays", "check_labels", "refuse_torch_file"]


def refuse_torch_file(path: str) -> None:
    """A pickled torch checkpoint is not a model mpcompile can read without its class."""
    if path.endswith((".pt", ".pth")):
        raise UsageError(f"{path}: this is a PyTorch file: export it (torch.onnx.export or torch.export.save "
                         "to .pt2) or use the Python API mpcompile.compile(module, example_inputs)")


def _graph_inputs(model: ir.Model) -> list[ir.Value]:
    return [v for v in model.graph.inputs if not v.is_initializer()]


def check_dim_names(model: ir.Model, dims: Iterable[str]) -> None:
    """Every ``--dim NAME=INT`` must name a symbolic dimension of some model input."""
    known = {str(d) for v in _graph_inputs(model) for d in (v.shape or []) if not isinstance(d, int)}
    unknown = sorted(set(dims) - known)
    if unknown:
        raise UsageError(f"--dim {unknown[0]}: no model input has a dimension named '{unknown[0]}' "
                         f"(named dimensions: {', '.join(sorted(known)) or 'none'})")


def check_layer_names(option: str, names: Iterable[str], layers: Iterable[str]) -> None:
    """Every layer named in ``option`` (e.g. ``--exclude``) must exist."""
    known = set(layers)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"{option} {unknown[0]}: no such layer (names as printed by `mpcompile analyze`)")


def check_input_arrays(source: str, model: ir.Model, arrays: Mapping[str, np.ndarray]) -> None:
    """Each array's dims after the sample axis must match the input's fixed dims."""
    for value in _graph_inputs(model):
        array = arrays.get(value.name)
        if array is None or value.shape is None or array.ndim != len(value.shape):
            continue
        dims = list(value.shape)
        if any(isinstance(d, int) and d > 0 and d != got for d, got in zip(dims[1:], array.shape[1:])):
            expected = ["N", *(d if isinstance(d, int) and d > 0 else str(d) for d in dims[1:])]
            raise UsageError(f"{source}: input '{value.name}' needs shape [{', '.join(map(str, expected))}] "
                             f"(N samples), got {list(array.shape)}")


def check_labels(source: str, labels: np.ndarray | None, samples: int) -> None:
    if labels is not None and (labels.ndim == 0 or labels.shape[0] != samples):
        got = "a scalar" if labels.ndim == 0 else f"{labels.shape[0]} entries"
        raise UsageError(f"{source}: 'labels' has {got} for {samples} samples; give one label per sample")
