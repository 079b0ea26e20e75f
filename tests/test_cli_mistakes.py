"""User mistakes get one line and a usage/bad-input exit code, never exit 70; inputs untouched."""

from __future__ import annotations

import numpy as np
import pytest

from _output_models import digests, mlp_with_external_data
from mpcompile.cli import main

FAST = ["--no-permute", "--method", "magnitude"]


@pytest.fixture
def model(tmp_path):
    return mlp_with_external_data(tmp_path)


def _calib(folder, name="calib.npz", **arrays):
    path = folder / name
    np.savez(path, **arrays)
    return str(path)


def _x(n=8, k=64):
    return np.random.default_rng(0).normal(size=(n, k)).astype(np.float32)


CASES = {
    "calib wrong channel count": (lambda f: ["--calib", _calib(f, x=_x(k=60))],
                                  "input 'x' needs shape [N, 64] (N samples), got [8, 60]"),
    "eval wrong channel count": (lambda f: ["--eval", _calib(f, x=_x(k=3))], "input 'x' needs shape [N, 64]"),
    "labels of the wrong length": (lambda f: ["--calib", _calib(f, x=_x(), labels=np.zeros(5, np.int64))],
                                   "'labels' has 5 entries for 8 samples"),
    "perm-time -1": (lambda f: ["--perm-time", "-1"], "--perm-time must be >= 0"),
    "exclude matches nothing": (lambda f: ["--exclude", "no_such_layer"], "--exclude no_such_layer: no such layer"),
    "dim matches nothing": (lambda f: ["--dim", "sequence=8"], "no model input has a dimension named 'sequence'"),
    "existing folder as -o": (lambda f: ["-o", str(f)], "is a folder"),
    "report into a missing folder": (lambda f: ["--report", str(f / "missing" / "r.json")], "does not exist"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compile_mistake_is_one_line_exit_2(model, capsys, case):
    make, fragment = CASES[case]
    argv = make(model.parent)
    before = digests(model.parent)
    assert main(["-q", str(model), *FAST, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mpcompile: error:") and fragment in err[0], err
    assert digests(model.parent) == before  # nothing written: no model, no report, no staging


def test_analyze_dim_matching_nothing(model, capsys):
    assert main(["-q", "analyze", str(model), "--dim", "seq=4"]) == 2
    assert "no model input has a dimension named 'seq'" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["analyze"]])
def test_pt_file_is_refused_with_advice(tmp_path, capsys, command):
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"PK\x03\x04 not really a checkpoint")
    assert main(["-q", *command, str(pt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "this is a PyTorch file: export it" in err[0] and "Python API" in err[0]
    assert pt.read_bytes() == b"PK\x03\x04 not really a checkpoint"


def test_cli_compiles_a_pt2_archive(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(64, 64), torch.nn.Linear(64, 32)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    archive = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(Net().eval(), (torch.randn(4, 64),)), str(archive))
    before = archive.read_bytes()
    assert main(["-q", str(archive), *FAST]) == 0
    assert (tmp_path / "net.sparse.onnx").is_file() and (tmp_path / "net.sparse.report.json").is_file()
    assert archive.read_bytes() == before
    assert main(["-q", "check", str(tmp_path / "net.sparse.onnx")]) == 0
