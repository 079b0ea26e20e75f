"""The HTML report opens with a headline, renders tables as HTML, and the install hint survives rich."""

from __future__ import annotations

import re
import shutil
from pathlib import Path


from mpcompile.report.html import render_html
from mpcompile.pipeline import CompileOptions, compile_model
from mpcompile.io.shapes import ShapeSpec

DATA = Path(__file__).resolve().parents[1] / "mpcompile" / "data"


def test_html_headline_tables_and_next_command(tmp_path):
    shutil.copy(DATA / "digits_mlp.onnx", tmp_path / "mlp.onnx")
    specs = [ShapeSpec(dims={"batch": b}) for b in (1, 64)]
    result = compile_model(tmp_path / "mlp.onnx", CompileOptions(output=str(tmp_path / "mlp.sparse.onnx"),
                                                                 perm_steps=20, speedup_shape_specs=specs))
    report = result.to_dict()
    page = render_html(report, result.analysis.result.layers)
    headline = page[page.index("<div class=headline>"):page.index("</div>")]
    assert f"{report['selection']['sparse_layers']} layers made 2:4" in headline
    assert "relative L2 drift" in headline and "Amdahl bound" in headline
    assert headline.count("FP32") >= 4 and "batch=1" in headline and "batch=64" in headline
    assert "trtexec --onnx=mlp.sparse.onnx --sparsity=enable" in headline
    assert "mpcompile build mlp.sparse.onnx --dense mlp.onnx" in headline
    assert "mpcompile mlp.onnx --fp16" in headline  # FP32 output: say which precision to emit
    # tables are HTML, not Markdown inside <pre>
    assert page.count("<table>") == 2 and not re.search(r"<pre>[^<]*\|---", page)
    assert len(re.findall(r"<tr><td>A40</td>", page)) == 2  # one speedup row per shape set
    # the digits MLP is modeled 1.00× everywhere: no per-layer latency plot, and it says why
    assert "Per-layer latency" not in page and "No per-layer latency plot" in page


def test_install_hint_keeps_its_brackets_through_rich(capsys):
    from rich.markup import escape

    from mpcompile.report.console import stderr_console
    from mpcompile.errors import OptionalDependencyError

    message = str(OptionalDependencyError("matplotlib", "plots", "the HTML report"))
    stderr_console(False).print(f"note: no HTML report: {escape(message)}")
    assert "pip install 'mpcompile[plots]'" in capsys.readouterr().err
