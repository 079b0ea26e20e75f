"""Machine-readable reports: versioned JSON written atomically.

Why a schema version: pipelines parse these files; a field may be added in a minor
version, but renaming or removing one bumps the major version. Fields are documented in
the README ("Report fields").
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

import mpcompile

__all__ = ["SCHEMA_VERSION", "report_header", "write_json", "write_text", "to_jsonable", "file_sha256"]

SCHEMA_VERSION = "1.0"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def report_header(command: str, model_path: Path | None, **extra: Any) -> dict[str, Any]:
    """The fields every mpcompile report starts with."""
    header: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "mpcompile", "version": mpcompile.__version__},
        "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"platform": platform.platform(), "python": platform.python_version()},
    }
    if model_path is not None:
        header["model"] = {
            "path": str(model_path),
            "bytes": model_path.stat().st_size,
            "sha256": file_sha256(model_path),
        }
    header.update(extra)
    return header


def to_jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays and non-finite floats into strict JSON values."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, Path):
        return str(value)
    return value


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(to_jsonable(report), indent=2, allow_nan=False)


def write_json(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a report atomically (temp file in the same folder, then rename)."""
    return write_text(dumps(report) + "\n", path)


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Write text atomically: a temp file in the same folder, then rename over the target."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; reports are meant to be shared
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
