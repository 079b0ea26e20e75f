"""Shared fixtures: tiny torch modules exported to ONNX in a temp folder (no downloads)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest


def export_torch(module, args, path: Path, *, dynamo: bool, input_names=("input",), dynamic_batch=True) -> Path:
    """Export a torch module with either exporter; the result is what users feed mpcompile."""
    torch = pytest.importorskip("torch")
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            pytest.importorskip("onnxscript")
            dynamic_shapes = None
            if dynamic_batch:
                batch = torch.export.Dim("batch", min=1, max=1024)
                dynamic_shapes = tuple({0: batch} for _ in args)
            program = torch.onnx.export(
                module, tuple(args), dynamo=True, input_names=list(input_names),
                dynamic_shapes=dynamic_shapes, verbose=False,
            )
            program.save(str(path))
        else:
            axes = {name: {0: "batch"} for name in input_names} if dynamic_batch else None
            torch.onnx.export(
                module, tuple(args), str(path), dynamo=False, input_names=list(input_names),
                output_names=["output"], dynamic_axes=axes, opset_version=17,
            )
    return path


@pytest.fixture
def export(tmp_path):
    counter = {"n": 0}

    def _export(module, args, *, dynamo: bool, **kw) -> Path:
        counter["n"] += 1
        return export_torch(module, args, tmp_path / f"m{counter['n']}.onnx", dynamo=dynamo, **kw)

    return _export


@pytest.fixture
def single_torch_thread():
    """Tiny torch workloads: a second intra-op thread only adds contention on a 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
