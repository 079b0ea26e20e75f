"""Masked weights moved out of memory as soon as they are written: one spill file on disk.

Why: a data-free compile of a decoder larger than the machine's memory (a 7B-shaped model is
13.5 GB in FP16) reads each weight lazily from the input's memory-mapped external data, masks
it and writes the result back into the graph as an in-memory array. Kept there, the masked
model grows to the whole model in anonymous memory by the last layer. Appended here instead
and replaced in the graph by an external tensor over this file, each masked weight costs
memory only while it is masked; the write stage then copies it, one tensor at a time, into
the output's own data file (the spill lives in the run's staging folder and goes with it:
the model reads its masked weights from it until the run's last report is written).

Every tensor starts at a page boundary so a memory map of it is a view, not a copy.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx_ir as ir

__all__ = ["SpillFile", "SPILL_ALIGN"]

SPILL_ALIGN = 4096


class SpillFile:
    """An append-only file of tensors; :meth:`spill` returns an external tensor over each."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._offset = 0
        self.path.write_bytes(b"")
        self.tensors = 0

    @property
    def nbytes(self) -> int:
        return self._offset

    def spill(self, array: np.ndarray, dtype: ir.DataType, name: str) -> ir.ExternalTensor:
        """Append ``array`` (C order) and return a lazily read tensor of it (nothing mapped yet)."""
        data = np.ascontiguousarray(array)
        pad = -self._offset % SPILL_ALIGN
        with open(self.path, "ab") as f:
            f.write(b"\0" * pad)
            f.write(memoryview(data).cast("B") if data.size else b"")
        offset = self._offset + pad
        self._offset = offset + data.nbytes
        self.tensors += 1
        return ir.ExternalTensor(self.path.name, offset, data.nbytes, dtype, shape=ir.Shape(data.shape),
                                 name=name, base_dir=str(self.path.parent))

    def view(self, tensor: ir.ExternalTensor) -> np.ndarray:
        """A read-only memory-mapped array of a spilled tensor, independent of ``tensor``'s own
        map (so unmapping that one after the write leaves this view valid)."""
        dtype = tensor.dtype.numpy()
        shape = tuple(int(d) for d in tensor.shape)
        if tensor.length == 0:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=tensor.offset, shape=shape)
