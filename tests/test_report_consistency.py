"""The same MACs, coverage and shapes statements in the console, the JSON, Markdown and HTML.

Found in review: one layer's MACs read 147k on the console (the weight's parameter count
standing in), ``null`` in the JSON and "—" in the HTML, and "100 % eligible" was claimed with
most MACs unknown. Each compile here is checked figure by figure across all four outputs; the
expected MAC counts are worked out by hand from the models' shapes.
"""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mpcompile.cli import main
from mpcompile.report.figures import macs_cell, macs_summary, selection_summary, speedup_summary

DATA = Path(__file__).resolve().parent.parent / "mpcompile" / "data"


def _compile(model: Path, capsys, *extra: str) -> tuple[str, dict, str, str]:
    out = model.with_name(model.stem + ".sparse.onnx")
    capsys.readouterr()
    assert main([str(model), "-o", str(out), "--no-permute", *extra]) == 0
    console = capsys.readouterr().out
    stem = str(out.with_suffix("")) + ".report"
    report = json.loads(Path(stem + ".json").read_text())
    return console, report, Path(stem + ".md").read_text(), html.unescape(Path(stem + ".html").read_text())


def _console_cell(console: str, layer: str, column: int) -> str:
    row = next(line for line in console.splitlines() if line.startswith("│ ") and f"│ {layer} " in line)
    return [c.strip() for c in row.strip("│").split("│")][column]


def _check_consistent(console: str, report: dict, md: str, page: str) -> None:
    flat = " ".join(console.split())  # the console wraps long lines
    for layer in report["layers"]:
        cell = macs_cell(layer["macs"])
        assert _console_cell(console, layer["name"], 3) == cell, layer["name"]
        assert f"| {layer['name']} | {layer['op']} | {layer['matrix_shape'][0]}×{layer['matrix_shape'][1]} | {cell} |" in md
        assert re.search(rf"<td>{re.escape(layer['name'])}</td><td>{layer['op']}</td><td>[^<]*</td>"
                         rf"<td class=num>{re.escape(cell)}</td>", page), layer["name"]
    coverage = selection_summary(report["selection"])
    assert coverage in flat and coverage in md and coverage in page
    assert report["speedup"], "no modeled speedup to compare"
    for item in report["speedup"]:
        line = speedup_summary(item)
        assert line in flat and line in md
        assert f"at {item['shapes']};" in page and item["shapes"] == report["shapes"]


def test_transformer_with_a_symbolic_batch_and_no_calib(tmp_path, capsys):
    model = tmp_path / "digits_vit.onnx"
    shutil.copy(DATA / "digits_vit.onnx", model)
    console, report, md, page = _compile(model, capsys)
    _check_consistent(console, report, md, page)
    # input N×1×8×8, 2×2 patches → 16 tokens of width 64; N defaults to 1 and the report says so
    assert report["shapes"] == "N=1 (default)"
    layers = {layer["name"]: layer["macs"] for layer in report["layers"]}
    assert layers["/blocks.0/q/MatMul"] == 1 * 16 * 64 * 64
    assert layers["/blocks.0/fc1/MatMul"] == 1 * 16 * 64 * 128
    assert layers["/head/Gemm"] == 64 * 10  # one class token row
    assert _console_cell(console, "/blocks.0/q/MatMul", 3) == "65.5k"
    sel = report["selection"]
    assert sel["unknown_macs_layers"] == 0 and sel["eligible_macs"] == 8 * 65536 + 4 * 131072
    assert "100.0% of eligible GEMM MACs (1.05M of 1.05M)" in selection_summary(sel)


def _unknown_macs_model(path: Path) -> Path:
    """mm1 at a known batch; mm2/mm3 behind NonZero rows, which no shape inference can count."""
    rng = np.random.default_rng(0)

    def weight(name):
        return numpy_helper.from_array((rng.standard_normal((64, 64)) * 0.1).astype(np.float32), name)

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
         helper.make_node("ReduceMax", ["h"], ["hm"], name="rm", axes=[1], keepdims=0),
         helper.make_node("Greater", ["hm", "zero"], ["pos"], name="gt"),
         helper.make_node("NonZero", ["pos"], ["nz"], name="nz"),
         helper.make_node("Squeeze", ["nz", "ax0"], ["idx"], name="sq"),
         helper.make_node("Gather", ["h", "idx"], ["r"], name="ga", axis=0),
         helper.make_node("MatMul", ["r", "w2"], ["h2"], name="mm2"),
         helper.make_node("MatMul", ["h2", "w3"], ["y"], name="mm3")], "unknown",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 64])],
        [weight("w1"), weight("w2"), weight("w3"), numpy_helper.from_array(np.array(0, np.float32), "zero"),
         numpy_helper.from_array(np.array([0], np.int64), "ax0")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_unknown_macs_are_counted_not_hidden_in_a_percentage(tmp_path, capsys):
    console, report, md, page = _compile(_unknown_macs_model(tmp_path / "unknown.onnx"), capsys, "--dim", "batch=4")
    _check_consistent(console, report, md, page)
    macs = {layer["name"]: layer["macs"] for layer in report["layers"]}
    assert macs == {"mm1": 4 * 64 * 64, "mm2": None, "mm3": None}
    assert _console_cell(console, "mm2", 3) == "–"  # not 4.1k, the weight's parameter count
    sel = report["selection"]
    assert sel["sparse_layers"] == 3 and sel["unknown_macs_layers"] == 2 and sel["eligible_layers"] == 3
    assert sel["eligible_macs"] == sel["sparse_macs"] == 4 * 64 * 64
    assert sel["sparse_fraction_of_eligible"] is None
    assert selection_summary(sel) == ("3 layers made 2:4: 16.4k of 16.4k known eligible GEMM MACs; "
                                      "2 of 3 eligible layers with unknown MACs")
    summary = report["summary"]
    assert summary["eligible_mac_fraction"] is None and summary["macs_unknown_layers"] == 2
    assert macs_summary(summary) == "GEMM MACs 16.4k known; 2 of 3 layers with unknown MACs"
    for item in report["speedup"]:
        assert item["layers"] == 3 and item["unknown_macs_layers"] == 2
        assert "2 of 3 layers with unknown MACs not modeled" in page
    assert report["shapes"] == "batch=4"
    assert "%" not in selection_summary(sel) and "% eligible" not in " ".join(console.split())


@pytest.mark.parametrize("argv, expected", [([], "N=1 (default)"), (["--dim", "N=8"], "N=8"),
                                            (["--shape", "input:2x1x8x8"], "input:2x1x8x8")])
def test_analyze_states_the_shapes_it_counted_at(argv, expected, capsys):
    assert main(["analyze", str(DATA / "digits_vit.onnx"), *argv]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"shapes: {expected};" in out
    batch = {"N=8": 8, "input:2x1x8x8": 2}.get(expected, 1)
    # 8 64×64 + 4 64×128/128×64 MatMuls over 16 tokens, plus the patch conv (64×4 per token) and head
    total = batch * (16 * (8 * 64 * 64 + 4 * 64 * 128) + 16 * 64 * 4 + 64 * 10)
    assert f"GEMM MACs {macs_cell(total)}," in out
