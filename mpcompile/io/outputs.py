"""Every file a run writes: guarded up front, staged together, checked, then committed.

Why: mpcompile runs unattended in deployment pipelines. A careless ``-o`` or ``--report`` must
never replace the input model or its weights, a model that fails the tool's own check must
never appear under its final name, and a reader must never pair a new graph with old weights.

The guard (:meth:`RunOutputs.add`, :meth:`RunOutputs.protect`) refuses, before any work, an
output that is or resolves to (symlink, hard link, ``./``, absolute path) an input file (the
model, its external-data files, calibration data) or another output of the same run, names an
existing folder or a missing one, or replaces an existing file without ``--force``.

Staging: every output is written into one hidden folder ``.mpcompile-<pid>-<start>-<token>``
per destination folder (a rename is atomic only within one file system). The caller checks
and validates the staged files, then :meth:`RunOutputs.commit` moves them into place in this
order, which every reader can rely on:

1. a journal (what will be moved, which old data files become garbage) is written in the folder;
2. each model's external data goes in under a new, content-addressed name
   ``MODEL.onnx.<sha256[:16]>.data`` that no existing graph references, so nothing changes for
   any reader yet;
3. the old reports of the replaced outputs are removed (a report never describes a model that
   is not in place; their sha256 fields say which file they describe);
4. each model file is renamed over its final name: one atomic switch to new graph + new weights;
5. the new reports take their final names;
6. old data files no graph references any more are removed, then the staging folder.

A run killed at any point leaves each final name either absent, or the old or the new
consistent file. Its staging folder (the pid in its name is dead) is found by the next run
writing into that folder, which finishes steps 6 with the journal and removes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
from onnx import external_data_helper

from mpcompile.errors import UsageError

__all__ = ["RunOutputs", "FileRecord", "model_files", "protected_files", "STAGING_PREFIX", "KILL_HOOK_ENV"]

STAGING_PREFIX = ".mpcompile-"
JOURNAL = "journal.json"
# Test hook: SIGKILL this process when it reaches the named stage (used by the kill tests only).
KILL_HOOK_ENV = "MPCOMPILE_TEST_KILL_AT"


def _stage(name: str) -> None:
    if os.environ.get(KILL_HOOK_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _sha256(path: Path, chunk: int = 1 << 18) -> str:
    """Read into one reused buffer: hashing a multi-GB data file costs ``chunk`` bytes of memory."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb") as handle:
        while size := handle.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


@dataclass
class FileRecord:
    """One file an output consists of, as the report states it."""

    path: str
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "bytes": self.bytes, "sha256": self.sha256}


def external_locations(model_path: Path) -> list[str]:
    """The external-data locations an ONNX file references (empty when it cannot be parsed).

    Read as a skeleton (weights left in the file, pages only mapped): the guard runs before
    every command and must not parse a multi-GB inline model a second time."""
    from mpcompile.io.proto_stream import load_skeleton

    try:
        proto = load_skeleton(model_path)
    except Exception:  # a file that is not ONNX references nothing
        return []
    # the skeleton points inline tensors at the file itself: that is not an external file
    return [name for name in _locations(proto) if name != Path(model_path).name]


def _locations(proto: onnx.ModelProto) -> list[str]:
    found: list[str] = []
    for tensor in external_data_helper._get_all_tensors(proto):
        if external_data_helper.uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location" and entry.value not in found:
                    found.append(entry.value)
    return found


def protected_files(model_path: str | os.PathLike, proto: onnx.ModelProto | None = None) -> list[Path]:
    """The model file and every external-data file it reads: what no output may replace."""
    path = Path(model_path)
    locations = _locations(proto) if proto is not None else external_locations(path)
    return [path, *(path.parent / location for location in locations)]


def model_files(model_path: str | os.PathLike) -> list[Path]:
    """The files a model consists of: the .onnx and each external-data file it references."""
    path = Path(model_path)
    return [path, *(path.parent / location for location in external_locations(path))]


def _same_file(a: Path, b: Path) -> bool:
    if os.path.abspath(a) == os.path.abspath(b) or a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _process_start(pid: int) -> str:
    """The kernel's start time of ``pid`` (Linux), so a reused pid is not taken for the owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


def _owner_alive(name: str) -> bool | None:
    """Whether the run that made staging folder ``name`` still runs (None: no owner recorded)."""
    parts = name[len(STAGING_PREFIX):].split("-")
    if len(parts) < 3 or not parts[0].isdigit():
        return None
    pid, start = int(parts[0]), parts[1]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start == "0" or _process_start(pid) in (start, "0")


def _recover(staging: Path) -> None:
    """Finish what a killed run's journal says: drop data files no graph references."""
    journal = staging / JOURNAL
    if journal.is_file():
        try:
            entries = json.loads(journal.read_text())["models"]
        except (ValueError, KeyError, OSError):
            entries = []
        folder = staging.parent
        for entry in entries:
            final = folder / entry["final"]
            referenced = set(external_locations(final)) if final.is_file() else set()
            for name in [*entry.get("new_data", []), *entry.get("old_data", [])]:
                if name not in referenced and "/" not in name and (folder / name).is_file():
                    (folder / name).unlink()
    shutil.rmtree(staging, ignore_errors=True)


def clean_stale(folder: Path) -> list[str]:
    """Remove staging folders of dead runs in ``folder``; one notice per folder found."""
    notices = []
    for entry in sorted(folder.glob(f"{STAGING_PREFIX}*")):
        if not entry.is_dir():
            continue
        alive = _owner_alive(entry.name)
        if alive is False:
            _recover(entry)
            notices.append(f"removed {entry}: temporary folder of a killed mpcompile run")
        elif alive is None:
            notices.append(f"found {entry}: temporary folder with no owner recorded "
                           "(left by an older mpcompile?); remove it if no run is using it")
    return notices


@dataclass
class _Output:
    final: Path
    option: str
    staged: Path | None = None
    is_model: bool = False
    data: Path | None = None  # staged external-data file of a model


class RunOutputs:
    """The outputs of one run (see the module doc). Use as a context manager: anything not
    committed when the block ends is discarded."""

    def __init__(self, inputs: Iterable[str | os.PathLike | None] = (), *, force: bool = False) -> None:
        self.force = force
        self._protected: list[Path] = []
        self._outputs: dict[Path, _Output] = {}
        self._staging: dict[Path, Path] = {}
        self.notices: list[str] = []
        self.protect(inputs)

    # ------------------------------------------------------------------ guard
    def protect(self, paths: Iterable[str | os.PathLike | None]) -> None:
        """Add input files no output may be; re-checks the outputs already registered."""
        for path in paths:
            if path is None:
                continue
            p = Path(path)
            self._protected.append(p)
            for out in self._outputs.values():
                self._refuse_input(out.final, out.option, [p])

    def _refuse_input(self, final: Path, option: str, protected: list[Path]) -> None:
        for guarded in protected:
            if _same_file(final, guarded):
                raise UsageError(f"{option} {final} is the input file {guarded}; choose another path")

    def add(self, path: str | os.PathLike, option: str) -> Path:
        """Register an output path (one line and exit 2 on any refusal); returns it absolute."""
        final = Path(os.path.abspath(path))
        if final in self._outputs and self._outputs[final].option == option:
            return final  # the same option registered again (the CLI, then the pipeline)
        if final.is_dir():
            raise UsageError(f"{option} {path}: is a folder; give a file name")
        if not final.parent.is_dir():
            raise UsageError(f"{option} {path}: folder {final.parent} does not exist")
        self._refuse_input(final, option, self._protected)
        for other in self._outputs.values():
            if _same_file(final, other.final):
                raise UsageError(f"{option} {path} is also the {other.option} output; give each output its own path")
        if (final.exists() or final.is_symlink()) and not self.force:
            raise UsageError(f"{option} {path} exists; pass --force to replace it")
        self._outputs[final] = _Output(final, option)
        return final

    def __contains__(self, path: str | os.PathLike) -> bool:
        return Path(os.path.abspath(path)) in self._outputs

    # ------------------------------------------------------------------ staging
    def _staging_for(self, folder: Path) -> Path:
        if folder not in self._staging:
            for notice in clean_stale(folder):
                print(f"mpcompile: note: {notice}", file=sys.stderr)  # one plain line, even under --quiet
                self.notices.append(notice)
            pid = os.getpid()
            name = f"{STAGING_PREFIX}{pid}-{_process_start(pid)}-{secrets.token_hex(4)}"
            staging = folder / name
            staging.mkdir()
            self._staging[folder] = staging
        return self._staging[folder]

    def stage_path(self, path: str | os.PathLike) -> Path:
        """Where to write the registered output ``path`` now (inside the staging folder)."""
        out = self._outputs[Path(os.path.abspath(path))]
        out.staged = self._staging_for(out.final.parent) / out.final.name
        return out.staged

    def write_text(self, path: str | os.PathLike, text: str) -> Path:
        staged = self.stage_path(path)
        staged.write_text(text, encoding="utf-8")
        return staged

    def save_model(self, model: ir.Model, path: str | os.PathLike, *, external_data: bool) -> Path:
        """Stage ``model`` (self-contained: every tensor it needs is written next to it, one
        tensor at a time); returns the staged .onnx path, for the check and validation."""
        from mpcompile.io.proto_stream import write_external_streamed, write_inline_streamed

        staged = self.stage_path(path)
        out = self._outputs[Path(os.path.abspath(path))]
        out.is_model = True
        if external_data:
            data = write_external_streamed(model, staged)
            out.data = staged.parent / data if data else None
        else:
            write_inline_streamed(model, staged)
        _stage("model-staged")
        return staged

    def files(self, path: str | os.PathLike) -> list[FileRecord]:
        """The files the staged output ``path`` consists of, named by their final paths."""
        out = self._outputs[Path(os.path.abspath(path))]
        assert out.staged is not None, "stage the output first"
        staged = [out.staged, *([out.data] if out.data else [])]
        return [FileRecord(str(out.final.parent / s.name), s.stat().st_size, _sha256(s)) for s in staged]

    # ------------------------------------------------------------------ commit
    def commit(self) -> None:
        # an output staged but not produced (the HTML page without matplotlib) is skipped
        staged = [o for o in self._outputs.values() if o.staged is not None and o.staged.exists()]
        models = [o for o in staged if o.is_model]
        protected = self._protected
        journal: list[dict[str, Any]] = []
        for out in models:
            new = [out.data.name] if out.data else []
            old = [name for name in (external_locations(out.final) if out.final.is_file() else [])
                   if "/" not in name and name not in new
                   and not any(_same_file(out.final.parent / name, p) for p in protected)]
            journal.append({"final": out.final.name, "new_data": new, "old_data": old})
        for folder, staging in self._staging.items():
            entries = [e for e, o in zip(journal, models) if o.final.parent == folder]
            (staging / JOURNAL).write_text(json.dumps({"models": entries}))
        _stage("journal")
        for out in models:
            if out.data:
                os.replace(out.data, out.final.parent / out.data.name)
        _stage("data")
        for out in staged:
            if not out.is_model and (out.final.exists() or out.final.is_symlink()):
                out.final.unlink()
        _stage("old-reports-removed")
        for out in models:
            os.replace(out.staged, out.final)
        _stage("models")
        for out in staged:
            if not out.is_model:
                os.replace(out.staged, out.final)
        _stage("reports")
        for entry, out in zip(journal, models):
            for name in entry["old_data"]:
                (out.final.parent / name).unlink(missing_ok=True)
        self.discard()

    def discard(self) -> None:
        """Remove every staged file (nothing under a final name is touched)."""
        for staging in self._staging.values():
            shutil.rmtree(staging, ignore_errors=True)
        self._staging.clear()
        for out in self._outputs.values():
            out.staged = out.data = None

    def __enter__(self) -> RunOutputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()
