"""mpcompile.compile round trips for every accepted input kind."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import mpcompile
from mpcompile.errors import UsageError
from mpcompile.io.model_io import load_model
from mpcompile.passes.gemm_discovery import discover_gemms

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))


def _shapes(path):
    return sorted(tuple(layer.matrix().shape) for layer in discover_gemms(load_model(path).model))


def test_compile_from_path_proto_ir_module_and_pt2(export, tmp_path):
    module = _mlp()
    x = torch.randn(4, 32)
    onnx_path = export(module, (x,), dynamo=True)
    results = {
        "path": mpcompile.compile(str(onnx_path), work_dir=tmp_path / "a", permute=False),
        "proto": mpcompile.compile(onnx.load(onnx_path), work_dir=tmp_path / "b", permute=False),
        "ir": mpcompile.compile(ir.load(onnx_path), work_dir=tmp_path / "c", permute=False),
        "module": mpcompile.compile(module, (x,), work_dir=tmp_path / "d", permute=False),
    }
    program = torch.export.export(module, (x,))
    pt2 = tmp_path / "mlp.pt2"
    torch.export.save(program, pt2)
    results["pt2"] = mpcompile.compile(str(pt2), work_dir=tmp_path / "e", permute=False)
    results["program"] = mpcompile.compile(program, work_dir=tmp_path / "f", permute=False)
    expected = _shapes(onnx_path)
    for kind, result in results.items():
        assert result.check_ok, kind
        assert len(result.selection.selected_names) == 2, kind
        # the same layers, whatever the input form
        assert _shapes(result.input_path) == expected, kind
    # same weights → same masks for path and module inputs
    a = {m.sparse.shape: m.sparse for m in results["path"].masks}
    d = {m.sparse.shape: m.sparse for m in results["module"].masks}
    for shape in a:
        np.testing.assert_array_equal(a[shape] != 0, d[shape] != 0)


def test_masks_apply_back_to_torch(tmp_path):
    module = _mlp()
    result = mpcompile.compile(module, (torch.randn(4, 32),), work_dir=tmp_path, permute=False)
    masks = mpcompile.api.apply_masks_to_torch(module, result)
    assert set(masks) == {"0.weight", "2.weight"}
    for name, mask in masks.items():
        w = dict(module.named_parameters())[name].detach().numpy()
        groups = (w != 0).reshape(w.shape[0], -1, 4).sum(axis=2)
        assert groups.max() <= 2


def test_bad_inputs():
    with pytest.raises(UsageError, match="unsupported model type"):
        mpcompile.compile(42)
    with pytest.raises(UsageError, match="example_inputs"):
        mpcompile.compile(_mlp())
    with pytest.raises(UsageError, match="unknown option"):
        mpcompile.compile("x.onnx", not_an_option=1)
