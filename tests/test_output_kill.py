"""SIGKILL a compile of a model with external data at every commit stage (mpcompile.io.outputs).

After each kill the final names are either absent or a complete, consistent model (it loads
with its data, passes the checker, and any report beside it describes exactly its files); the
next run in the folder removes the killed run's staging folder and its orphaned data files.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from _output_models import mlp_with_external_data
from mpcompile.checks.checker import check_model
from mpcompile.io.outputs import KILL_HOOK_ENV, STAGING_PREFIX, external_locations

STAGES = ["model-staged", "journal", "data", "old-reports-removed", "models", "reports"]


def _compile(model: Path, target: str, kill_at: str | None) -> int:
    env = {**os.environ, KILL_HOOK_ENV: kill_at or ""}
    cmd = [sys.executable, "-m", "mpcompile", "-q", str(model), "--no-permute", "--method", "magnitude",
           "--target", target, "--force"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True).returncode


def _assert_consistent(folder: Path) -> None:
    out = folder / "m.sparse.onnx"
    report = folder / "m.sparse.report.json"
    if not out.exists():
        assert not report.exists()
        return
    data = external_locations(out)
    assert data and all((folder / name).is_file() for name in data)
    assert check_model(out).ok
    y = ort.InferenceSession(str(out)).run(None, {"x": np.ones((1, 64), np.float32)})[0]
    assert np.isfinite(y).all()
    if report.exists():  # a report in place always describes the model in place
        files = json.loads(report.read_text())["output"]["files"]
        assert {Path(f["path"]).name: f["sha256"] for f in files} == {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in [out, *(folder / n for n in data)]}


def _garbage(folder: Path) -> list[str]:
    """Staging folders, and sparse data files the model in place does not reference."""
    out = folder / "m.sparse.onnx"
    live = set(external_locations(out)) if out.exists() else set()
    return sorted([p.name for p in folder.glob(f"{STAGING_PREFIX}*")]
                  + [p.name for p in folder.glob("m.sparse.onnx.*.data") if p.name not in live])


def test_sigkill_at_every_stage_leaves_consistent_names_and_is_cleaned_up(tmp_path):
    model = mlp_with_external_data(tmp_path)
    input_bytes = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert _compile(model, "0.5", None) == 0
    for index, stage in enumerate(STAGES):
        target = "1.0" if index % 2 == 0 else "0.5"  # alternate, so every run changes the weights
        assert _compile(model, target, stage) == -signal.SIGKILL, stage
        _assert_consistent(tmp_path)
        assert _garbage(tmp_path), f"a kill at {stage} left nothing to clean: the hook did not fire"
    assert _compile(model, "1.0", None) == 0
    _assert_consistent(tmp_path)
    assert _garbage(tmp_path) == []
    assert {name: (tmp_path / name).read_bytes() for name in input_bytes} == input_bytes
