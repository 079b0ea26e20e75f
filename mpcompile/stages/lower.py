"""Stage ``lower``: the graph passes after masking (``--conv im2col``, ``--fp16``).

A pure graph rewrite, so it composes onnx_ir passes with ``onnx_ir.passes.Sequential``
(the building block of ``PassManager``). Why not ``PassManager`` itself: it wraps every
error in a ``PassError``, and a pass's own one-line error (and exit code) must reach the user.
"""

from __future__ import annotations

import onnx_ir as ir

from mpcompile.stages.state import CompileState

__all__ = ["LowerStage", "lowering_passes", "run_passes"]


def lowering_passes(state: CompileState) -> list[ir.passes.PassBase]:
    passes: list[ir.passes.PassBase] = []
    if state.options.conv == "im2col":
        from mpcompile.passes.im2col_lowering import LowerConvToIm2colPass

        passes.append(LowerConvToIm2colPass([layer.node for layer in state.selected if layer.op_type == "Conv"]))
    if state.options.fp16:
        from mpcompile.passes.fp16 import ConvertToFloat16Pass

        passes.append(ConvertToFloat16Pass())
    return passes


def run_passes(passes: list[ir.passes.PassBase], model: ir.Model) -> ir.passes.PassResult:
    """Run ``passes`` in order on ``model``; a pass's own exception propagates unwrapped."""
    try:
        return ir.passes.Sequential(*passes)(model)
    except ir.passes.PassError as exc:
        if exc.__cause__ is not None:
            raise exc.__cause__ from None
        raise


class LowerStage:
    name = "lower"
    timing = None

    def applies(self, state: CompileState) -> bool:
        return state.options.conv == "im2col" or state.options.fp16

    def run(self, state: CompileState) -> None:
        run_passes(lowering_passes(state), state.model)
        in_bodies = [layer.name for layer in state.selected
                     if state.options.fp16 and layer.node.graph is not state.model.graph]
        if in_bodies:
            state.notes.append(f"--fp16 leaves If/Loop/Scan bodies in FP32: {len(in_bodies)} 2:4 layer(s) there run "
                               f"dense in a strongly typed TensorRT engine ({', '.join(in_bodies)})")
