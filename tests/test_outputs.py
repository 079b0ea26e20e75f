"""Every output path is guarded, staged, checked and committed together (mpcompile.io.outputs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from _output_models import digests, mlp_with_external_data
from mpcompile.cli import main
from mpcompile.io.outputs import STAGING_PREFIX, external_locations

FAST = ["--no-permute", "--method", "magnitude", "--target", "0.5"]


@pytest.fixture
def model(tmp_path):
    return mlp_with_external_data(tmp_path)


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line]
    assert len(err) == 1, err
    assert err[0].startswith("mpcompile: error:")
    return err[0]


def _link(kind):
    def make(folder, target):
        link = folder / f"{kind}.onnx"
        (os.symlink if kind == "symlink" else os.link)(target, link)
        return str(link)
    return make


# (argv after the model, fragment of the message); "M" stands for the model, "D" for its data file
REFUSED = {
    "compile --report M": (["--report", "M"], "is the input file"),
    "compile -o D": (["-o", "D"], "is the input file"),
    "compile --report D": (["--report", "D"], "is the input file"),
    "compile -o ./M": (["-o", "./M"], "is the input file"),
    "compile -o and --report the same": (["-o", "x.onnx", "--report", "x.onnx"], "is also the -o output"),
    "compile -o a folder": (["-o", "."], "is a folder"),
    "compile --report into a missing folder": (["--report", "nofolder/r.json"], "does not exist"),
    "analyze -o M": (["analyze", "-o", "M"], "is the input file"),
    "analyze -o D": (["analyze", "-o", "D"], "is the input file"),
    "analyze --annotate D": (["analyze", "--annotate", "D"], "is the input file"),
    "analyze -o into a missing folder": (["analyze", "-o", "nofolder/r.json"], "does not exist"),
    "analyze -o and --annotate the same": (["analyze", "-o", "a.onnx", "--annotate", "a.onnx"], "is also"),
    "check -o M": (["check", "-o", "M"], "is the input file"),
    "check -o D": (["check", "-o", "D"], "is the input file"),
    "limit -o M": (["limit", "-o", "M"], "is the input file"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_output_guard_refuses_in_one_line_and_writes_nothing(model, capsys, monkeypatch, case):
    argv, fragment = REFUSED[case]
    monkeypatch.chdir(model.parent)
    subst = {"M": str(model), "D": str(model.parent / "m.onnx.data"), "./M": "./m.onnx"}
    argv = [subst.get(a, a) for a in argv]
    command = [argv.pop(0)] if argv[0] in ("analyze", "check", "limit") else []
    before = digests(model.parent)
    assert main(["-q", *command, str(model), *argv, *(FAST if not command else [])]) == 2
    assert fragment in _one_error_line(capsys)
    assert digests(model.parent) == before  # input intact, nothing written, no staging folder left


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "absolute"])
def test_guard_sees_through_links_and_absolute_paths(model, capsys, kind):
    target = str(model.resolve()) if kind == "absolute" else _link(kind)(model.parent, model)
    before = digests(model.parent)
    assert main(["-q", str(model), "--report", target, "--force", *FAST]) == 2
    assert "is the input file" in _one_error_line(capsys)
    assert digests(model.parent) == before


def test_existing_output_needs_force(model, capsys):
    assert main(["-q", str(model), *FAST]) == 0
    capsys.readouterr()
    before = digests(model.parent)
    assert main(["-q", str(model), *FAST]) == 2
    assert "pass --force to replace it" in _one_error_line(capsys)
    assert digests(model.parent) == before
    assert main(["-q", str(model), *FAST, "--force"]) == 0


def _run(session, x):
    return session.run(None, {"x": x})[0]


def test_output_is_self_contained_and_report_hashes_every_file(model, tmp_path, capsys):
    """Issue 11.3: the output carries all its tensors; moved elsewhere with the input deleted,
    it loads and gives the same numbers. The report's sha256 fields describe exactly those files."""
    assert main(["-q", str(model), *FAST]) == 0
    out = model.parent / "m.sparse.onnx"
    x = np.random.default_rng(1).normal(size=(4, 64)).astype(np.float32)
    expected = _run(ort.InferenceSession(str(out)), x)
    report = json.loads((model.parent / "m.sparse.report.json").read_text())
    files = report["output"]["files"]
    assert [os.path.basename(f["path"]) for f in files][0] == "m.sparse.onnx"
    assert len(files) == 2 and files[1]["path"].endswith(".data")  # the input had external data
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for record in files:
        shutil.move(record["path"], elsewhere)
    model.unlink()
    (model.parent / "m.onnx.data").unlink()
    moved = digests(elsewhere)
    assert {os.path.basename(f["path"]): f["sha256"] for f in files} == moved
    np.testing.assert_array_equal(_run(ort.InferenceSession(str(elsewhere / "m.sparse.onnx")), x), expected)
    assert main(["-q", "check", str(elsewhere / "m.sparse.onnx")]) == 0


def test_force_replaces_model_and_drops_its_old_data_file(model, capsys):
    assert main(["-q", str(model), *FAST]) == 0
    first = sorted(p.name for p in model.parent.glob("m.sparse.onnx.*.data"))
    assert main(["-q", str(model), "--no-permute", "--method", "magnitude", "--target", "1.0", "--force"]) == 0
    second = sorted(p.name for p in model.parent.glob("m.sparse.onnx.*.data"))
    assert len(first) == len(second) == 1 and first != second  # new weights, new name, old file gone
    assert (model.parent / "m.onnx.data").is_file()  # the input's data is never collected
    report = json.loads((model.parent / "m.sparse.report.json").read_text())
    assert os.path.basename(report["output"]["files"][1]["path"]) == second[0]


def test_failed_check_leaves_nothing_under_the_final_names(model, capsys, monkeypatch):
    from mpcompile.checks.checker import CheckReport

    monkeypatch.setattr(CheckReport, "ok", property(lambda self: False))
    before = digests(model.parent)
    assert main(["-q", str(model), *FAST]) == 1
    assert "nothing written" in capsys.readouterr().err
    assert digests(model.parent) == before


def test_stale_staging_folders_are_recovered_or_named(model, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = model.parent / f"{STAGING_PREFIX}{dead.pid}-0-deadbeef"
    stale.mkdir()
    (stale / "m.sparse.onnx").write_bytes(b"half written")
    orphan = model.parent / "m.sparse.onnx.0123456789abcdef.data"
    orphan.write_bytes(b"weights of a graph that never took its name")
    (stale / "journal.json").write_text(json.dumps(
        {"models": [{"final": "m.sparse.onnx", "new_data": [orphan.name], "old_data": []}]}))
    unowned = model.parent / f"{STAGING_PREFIX}abc123"
    unowned.mkdir()
    assert main([str(model), *FAST]) == 0
    err = capsys.readouterr().err
    assert not stale.exists() and not orphan.exists()
    assert unowned.is_dir() and str(unowned) in err  # no owner recorded: named, not deleted
    assert [p.name for p in model.parent.glob(f"{STAGING_PREFIX}*")] == [unowned.name]


def test_annotate_with_external_data_is_self_contained(model, tmp_path, capsys):
    out = tmp_path / "ann" / "a.onnx"
    out.parent.mkdir()
    assert main(["-q", "analyze", str(model), "--annotate", str(out), "-o", str(tmp_path / "ann" / "r.json")]) == 0
    report = json.loads((tmp_path / "ann" / "r.json").read_text())
    assert {os.path.basename(f["path"]) for f in report["annotated"]["files"]} == {p.name for p in out.parent.iterdir()} - {"r.json"}
    x = np.ones((2, 64), np.float32)
    dense = _run(ort.InferenceSession(str(model)), x)
    model.unlink()
    (model.parent / "m.onnx.data").unlink()
    moved = tmp_path / "moved"
    shutil.copytree(out.parent, moved)
    np.testing.assert_array_equal(_run(ort.InferenceSession(str(moved / "a.onnx")), x), dense)


def test_a_live_runs_staging_folder_is_left_alone(tmp_path):
    from mpcompile.io.outputs import _process_start, clean_stale

    live = tmp_path / f"{STAGING_PREFIX}{os.getpid()}-{_process_start(os.getpid())}-cafe0001"
    live.mkdir()
    assert clean_stale(tmp_path) == [] and live.is_dir()
    reused = tmp_path / f"{STAGING_PREFIX}{os.getpid()}-1-cafe0002"  # same pid, other start time: a dead run
    reused.mkdir()
    if _process_start(os.getpid()) != "0":
        assert len(clean_stale(tmp_path)) == 1 and not reused.exists() and live.is_dir()


@pytest.mark.parametrize("external", [False, True])
def test_saved_model_never_points_at_the_input_data(model, tmp_path, external):
    """Inline or external, a model loaded from external data is written with all its tensors."""
    import onnx

    from mpcompile.io.model_io import load_model, save_model

    loaded = load_model(model)
    (tmp_path / "copy").mkdir()
    out = save_model(loaded.model, tmp_path / "copy" / "c.onnx", protect=(model,), external_data=external)
    locations = external_locations(out)
    assert (len(locations) == 1) == external and "m.onnx.data" not in locations
    model.unlink()
    (model.parent / "m.onnx.data").unlink()
    moved = tmp_path / "moved"
    shutil.copytree(out.parent, moved)
    restored = onnx.load(str(moved / "c.onnx"))
    w = {t.name: onnx.numpy_helper.to_array(t) for t in restored.graph.initializer}
    np.testing.assert_array_equal(w["w1"], np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32))


def test_build_refuses_derived_outputs_that_would_replace_an_input(model, capsys):
    """`build` writes engines and a reverted model beside the model: those names are guarded too."""
    dense = model.parent / "m.reverted.onnx"  # what `build m.onnx --dense ...` would write its revert to
    shutil.copy(model, dense)
    before = digests(model.parent)
    assert main(["-q", "build", str(model), "--dense", str(dense)]) == 2
    line = _one_error_line(capsys)
    assert "the reverted model" in line and "is the input file" in line, line
    assert digests(model.parent) == before
    assert main(["-q", "build", str(model), "-o", str(model)]) == 2
    assert "is the input file" in _one_error_line(capsys)
    assert digests(model.parent) == before
