"""The model argument of a subcommand: ONNX as is, a ``.pt2`` archive exported to ONNX first."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mpcompile.checks.user_checks import refuse_torch_file

__all__ = ["onnx_input"]


@contextmanager
def onnx_input(path: str) -> Iterator[str]:
    """Yield an ONNX path for ``path``: a torch.export archive (``.pt2``, as the README promises)
    is exported with the Python API's front end into a temporary folder, removed afterwards;
    a pickled ``.pt`` is refused in one line."""
    refuse_torch_file(path)
    if not path.endswith(".pt2"):
        yield path
        return
    if not Path(path).is_file():
        from mpcompile.errors import InvalidModelError

        raise InvalidModelError(f"{path}: no such file")
    from mpcompile.io.model_forms import to_onnx_path

    work = tempfile.mkdtemp(prefix="mpcompile-pt2-")
    try:
        yield str(to_onnx_path(path, work_dir=work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
