"""Keep memory-mapped weights from piling up in memory: read one, use it, unmap it.

Why: ``onnx_ir`` reads external data through ``mmap``; every page a pass touches stays
resident (and counts in the process's RSS) until the tensor's map is closed. A pass that
visits every weight of a 13 GB model once would end holding all 13 GB. Unmapping each
tensor after its use bounds the resident weights to the few layers in flight; the next
read maps the file again, at the cost of a page-cache hit.
"""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["release", "release_all"]


def release(tensor: ir.TensorProtocol | None) -> bool:
    """Unmap ``tensor`` if it is a lazily read external tensor; True when it was.

    A tensor whose mapped array is still referenced elsewhere (a view handed out) cannot be
    closed: it stays mapped (Python refuses to close a buffer with live views) and False is
    returned, which costs memory, never correctness.
    """
    if not isinstance(tensor, ir.ExternalTensor):
        return False
    try:
        tensor.release()
    except BufferError:
        return False
    return True


def release_all(model: ir.Model) -> int:
    """Unmap every main-graph external initializer of ``model``; the number unmapped."""
    return sum(release(value.const_value) for value in model.graph.initializers.values())
