"""Stage ``speedup``: the modeled TensorRT speedup of the result (``trt/speedup.py``), labelled so."""

from __future__ import annotations

from mpcompile.stages.state import CompileState

__all__ = ["SpeedupStage"]


class SpeedupStage:
    name = "speedup"
    timing = None

    def applies(self, state: CompileState) -> bool:
        return True

    def run(self, state: CompileState) -> None:
        from mpcompile.trt.speedup import shape_set_speedups

        opts, analysis = state.options, state.analysis
        precision = "fp16" if opts.fp16 else "fp32"
        specs = opts.speedup_shape_specs if len(opts.speedup_shape_specs) > 1 else [analysis.shape_spec]
        speedup = ([] if state.unstructured
                   else shape_set_speedups(analysis, set(state.selection.selected_names), specs, precision))
        state.speedup = speedup
        if not speedup:
            return
        state.notes.append(
            f"speedups are modeled (roofline from datasheet throughput, {precision.upper()} engine, at "
            f"{'; '.join(s.describe() for s in specs)}); measure with `mpcompile build` on a GPU"
        )
        if precision == "fp32":
            best = max(speedup, key=lambda e: e.get("fp16_speedup", 1.0))
            gain = best.get("fp16_speedup", 1.0)
            state.notes.append(
                "the output is FP32: a TensorRT 10+ strongly typed engine runs it without 2:4 kernels "
                "(modeled 1.00×); compile with --fp16 for a sparse engine"
                + (f" (modeled up to {gain:.2f}× on {best['gpu']} at FP16)" if gain > 1.005 else
                   " (at these shapes even FP16 is modeled 1.00×: layers too small or memory bound)"))
