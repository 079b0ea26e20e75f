"""When a compile streams, and what streaming does to one masked layer.

Why a rule of its own: a data-free compile of a model bigger than the machine's memory must
never hold the model. It reads each weight lazily (memory-mapped external data), masks it,
moves the masked tensor to a spill file in the run's staging folder (``io/spill.py``) and
lets both go before the next layer: the weights resident at once are those of the layer in
flight. Streaming needs the dense weight gone once the spectrum figures are taken
(``keep_dense=False``, the CLI's setting) and no later stage that rewrites or re-reads every
masked weight from memory (measured order, drift budget, ``--fp16``, ``--conv im2col``).

End-to-end validation in ONNX Runtime runs the whole model once, which maps every weight:
the process then holds the model's size in (file-backed) memory. Above
:data:`END_TO_END_RAM_SHARE` of the machine's memory it is skipped for a data-free compile,
and the report says so; the independent 2:4 checker still re-reads every written weight.
"""

from __future__ import annotations

import os

from mpcompile.io.spill import SpillFile
from mpcompile.passes.sparsify_24 import LayerMask
from mpcompile.stages.options import DATA_METHODS
from mpcompile.stages.state import CompileState

__all__ = ["END_TO_END_RAM_SHARE", "streams", "open_spill", "spill_layer", "end_to_end_skipped", "weight_bytes",
           "machine_ram"]

END_TO_END_RAM_SHARE = 0.25


def streams(state: CompileState) -> bool:
    """Whether the mask stage moves each masked weight to disk (see the module doc).

    ``options.stream``: None (default) streams a model read with external data, True any
    model, False never; either way only where nothing later needs the weights in memory."""
    opts = state.options
    wanted = state.input_external if opts.stream is None else opts.stream
    return bool(wanted and not opts.keep_dense and not state.measured_order and opts.max_drift is None
                and not opts.fp16 and opts.conv == "native" and not state.unstructured)


def open_spill(state: CompileState) -> SpillFile:
    """The run's spill file, beside the staged output. It lives as long as the staging folder
    (commit or discard removes both): the model's masked weights are read from it until the
    run's last report is written (the HTML report's spectra read the largest weights)."""
    if state.spill is None:
        staged = state.files.stage_path(state.out_path)
        state.spill = SpillFile(staged.with_name(staged.name + ".spill"))
    return state.spill


def spill_layer(spill: SpillFile, layer, mask: LayerMask) -> bool:
    """Move ``layer``'s just-masked stored weight to ``spill``; ``mask.sparse`` becomes a
    memory-mapped view of it. False (left in memory) for weights not stored plainly as an
    initializer (Constant nodes, Transpose chains, conv kernels): rare, and small."""
    root = layer.weight.root
    tensor = root.const_value
    if (tensor is None or not root.is_initializer() or layer.op_type == "Conv"
            or any(node.op_type == "Transpose" for node in layer.weight.chain)):
        return False
    external = spill.spill(tensor.numpy(), tensor.dtype, root.name)
    root.const_value = external
    view = spill.view(external)
    mask.sparse = view.T if layer.layout in ("matmul", "gemm_transB0") else view
    return True


def weight_bytes(state: CompileState) -> int:
    return sum(v.const_value.nbytes for v in state.model.graph.initializers.values() if v.const_value is not None)


def machine_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def end_to_end_skipped(state: CompileState) -> str | None:
    """Why end-to-end ONNX Runtime validation is not run (None: it is)."""
    opts = state.options
    if state.method in DATA_METHODS or state.measured_order or opts.max_drift is not None:
        return None  # those run the model anyway (capture, drift): validation adds no new peak
    size, ram = weight_bytes(state), machine_ram()
    if size <= END_TO_END_RAM_SHARE * ram:
        return None
    return (f"end-to-end ONNX Runtime validation skipped: running the model maps all its {size / 1e9:.1f} GB of "
            f"weights at once, more than {END_TO_END_RAM_SHARE:.0%} of this machine's {ram / 1e9:.1f} GB of memory; "
            "the independent 2:4 check re-read every written weight, and each layer's spectrum change is reported")
