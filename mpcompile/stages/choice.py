"""Stage ``choice``: the accuracy-budget layer choice (``--order choice``, the default for
``--max-drift`` with ``--calib``): the most modeled gain within the drift budget.

Runs, like ``drift_order``, once every candidate is masked: each probe only swaps a unit's
weights between their dense and 2:4 versions and costs one ONNX Runtime pass on a fixed
sample (:data:`CHOICE_SAMPLES`). The algorithm is ``selection/choice.py``; the gains
``selection/gain.py``. The chosen set is then re-measured on all calibration samples, and
units are dropped from the end while it exceeds the budget there, so the budget the report
states holds on the calibration data, not only on the sample.
"""

from __future__ import annotations

from mpcompile.checks.validate import relative_drift
from mpcompile.errors import UsageError
from mpcompile.io.runner import run_model
from mpcompile.passes.sparsify_24 import restore_dense, write_matrix
from mpcompile.selection.choice import Unit, choose_within_budget
from mpcompile.selection.drift import weight_groups
from mpcompile.selection.gain import GAIN_PRECISION, layer_gains, modeled_total_speedup
from mpcompile.stages.state import CompileState

__all__ = ["ChoiceStage", "check_choice_options", "resolve_order", "CHOICE_PRIORS"]

CHOICE_PRIORS = ("mp", "graph")
MAX_SINGLE_UNITS = 24
"""Up to this many masked weights each is its own unit; beyond, layers sharing an input are grouped."""
CHOICE_SAMPLES = 256
"""Calibration samples each probe runs (the default --calib-samples: then the greedy sees exactly the
data the budget is verified on; a 64-sample proxy left budget unused after the verification)."""


def resolve_order(options) -> str:
    """``--order`` as given, else ``choice`` for ``--max-drift`` with calibration data, else ``mp``
    (data-free: synthetic inputs rank nothing worth trusting)."""
    if options.order is not None:
        return options.order
    return "choice" if options.max_drift is not None and options.calib else "mp"


def check_choice_options(options) -> None:
    """Reject option combinations the choice cannot honour, before any work (exit 2)."""
    order = resolve_order(options)
    if order == "choice" and options.max_drift is None:
        raise UsageError("--order choice spends an accuracy budget: give --max-drift FRACTION")
    if options.max_drift is not None and not options.max_drift > 0:
        raise UsageError(f"--max-drift must be > 0, got {options.max_drift:g}")
    if options.gpu is not None:
        from mpcompile.trt.model import gpu_spec

        gpu_spec(options.gpu)  # an unknown name is a UsageError listing the known ones
        if order != "choice":
            raise UsageError("--gpu weighs layers for the --max-drift layer choice: give --max-drift with --calib "
                             "(or --order choice)")
    if options.choice_prior not in CHOICE_PRIORS:
        raise UsageError(f"choice_prior must be one of {CHOICE_PRIORS}, got {options.choice_prior!r}")


class ChoiceStage:
    name = "choice"
    timing = "drift_search"

    def applies(self, state: CompileState) -> bool:
        return state.order == "choice"

    def run(self, state: CompileState) -> None:
        from mpcompile.stages.reference import subset  # reference imports resolve_order from here

        opts, model, selection = state.options, state.model, state.selection
        budget = opts.max_drift
        if opts.gpu is not None:
            from mpcompile.trt.model import gpu_spec

            gpu = gpu_spec(opts.gpu).name  # "A100" → the table's entry, named so in every figure
        else:
            gpu = None
        groups = weight_groups(state.selected, state.masks)
        masks = {m.layer: m for m in state.masks}
        # one unit per weight on small models; on larger ones the layers reading one activation
        # (q, k, v of a block) go 2:4 together, which bounds the ONNX Runtime passes
        by_input: dict[object, list[str]] = {}
        for mask in state.masks:
            node = groups[mask.layer][0].node
            key = node.inputs[0] if len(state.masks) > MAX_SINGLE_UNITS and node.inputs else mask.layer
            by_input.setdefault(key, []).append(mask.layer)
        unit_masks = list(by_input.values())
        analyses = {a.name: a for a in state.analysis.result.layers}
        members = [[layer.name for name in unit for layer in groups[name]] for unit in unit_masks]
        gains = layer_gains(state.analysis.result.layers, {n for m in members for n in m}, gpu,
                            state.analysis.shapes)
        units = []
        for unit, names in zip(unit_masks, members):
            gain = sum(gains[n].gain for n in names)
            reasons = list(dict.fromkeys(gains[n].reason for n in names if (gains[n].gain > 0) == (gain > 0)))
            if len(names) > 1 and gain > 0:
                reasons.insert(0, f"{gain:.3g} {'µs saved (modeled)' if gpu else 'MACs'} in all")
            ranks = [analyses[n].prune_rank for n in names if analyses[n].prune_rank is not None]
            units.append(Unit(names, gain, "; ".join(reasons), min(ranks) if ranks else 1 << 30))

        for mask in state.masks:
            write_matrix(groups[mask.layer][0], mask.dense)
        sample = subset(state.data, CHOICE_SAMPLES)
        sample_out = (state.dense_calib_out if sample.samples == state.data.samples
                      else run_model(model, sample, opts.batch_size)[0])

        def set_unit(index: int, sparse: bool) -> None:
            for name in unit_masks[index]:
                write_matrix(groups[name][0], masks[name].sparse if sparse else masks[name].dense)

        def drift(data, dense_out) -> float:
            return relative_drift(dense_out, run_model(model, data, opts.batch_size)[0])

        with state.progress("layer choice (ONNX Runtime passes)", 2 * len(units)) as advance:
            def probe(index: int) -> float:
                """Drift with this unit 2:4 on top of the accepted ones (none yet: alone)."""
                set_unit(index, True)
                value = drift(sample, sample_out)
                set_unit(index, False)
                advance(unit_masks[index][0])
                return value

            outcome = choose_within_budget(units, budget, probe, probe, lambda i: set_unit(i, True),
                                           prior=opts.choice_prior)
        for index in outcome.accepted:
            set_unit(index, True)
        final_sample = outcome.drift
        final_calib, evaluations = final_sample, outcome.evaluations
        if state.data.samples > sample.samples and outcome.accepted:
            final_calib, evaluations = drift(state.data, state.dense_calib_out), evaluations + 1
            while final_calib > budget and outcome.accepted:
                index = outcome.accepted.pop()
                set_unit(index, False)
                decision = outcome.decisions[index]
                decision.accepted, decision.step = False, None
                decision.reason = (f"kept dense: the chosen set drifted {final_calib:.3g} > --max-drift {budget:g} on "
                                   f"all {state.data.samples} calibration samples; the last unit chosen is dropped")
                final_calib = drift(state.data, state.dense_calib_out) if outcome.accepted else 0.0
                evaluations += 1
        self._apply(state, units, unit_masks, groups, masks, outcome)
        chosen = {n for i in outcome.accepted for n in units[i].layers}
        speedup = modeled_total_speedup(state.analysis.result.layers, chosen, gpu, state.analysis.shapes) if gpu else None
        selection.choice = {
            "max_drift": budget, "gpu": gpu, "prior": opts.choice_prior,
            "gain": (f"µs saved per layer on {gpu}, modeled (roofline, {GAIN_PRECISION.upper()} engine, at "
                     f"{state.analysis.shape_spec.describe()})" if gpu else "MACs made 2:4"),
            "drift": "relative L2 output drift vs the dense model (mean over samples)",
            "sample_samples": sample.samples, "calibration_samples": state.data.samples,
            "evaluations": evaluations, "drift_on_sample": final_sample, "drift_on_calibration": final_calib,
            "modeled_speedup": speedup, "modeled_speedup_precision": GAIN_PRECISION if gpu else None,
            "units": [d.to_dict() for d in outcome.decisions],
        }
        state.notes.append(
            f"--max-drift {budget:g} layer choice: {len(outcome.accepted)} of {len(units)} units made 2:4, most "
            + (f"modeled {GAIN_PRECISION.upper()} time saved on {gpu}" if gpu else "MACs")
            + f" within the budget; drift {final_calib:.4g} on {state.data.samples} calibration samples "
            f"({evaluations} ONNX Runtime passes, greedy on {sample.samples} samples, {opts.choice_prior} prior)"
            + (f"; modeled {speedup:.2f}× end to end on {gpu} at {GAIN_PRECISION.upper()}" if speedup else ""))
        if gpu and not opts.fp16:
            state.notes.append(f"--gpu {gpu}: gains are modeled for an FP16 engine; this FP32 output gets no 2:4 "
                               "kernels in TensorRT 10+ (compile with --fp16)")

    @staticmethod
    def _apply(state, units, unit_masks, groups, masks, outcome) -> None:
        """Trim ``state.masks`` to the chosen units and give every decision its reason."""
        selection = state.selection
        by_layer = {n: outcome.decisions[i] for i, unit in enumerate(units) for n in unit.layers}
        kept: set[int] = set()
        for index, unit in enumerate(unit_masks):
            for name in unit:
                if outcome.decisions[index].accepted:
                    kept.add(id(masks[name]))
                else:
                    restore_dense(groups[name], masks[name].dense)
        for decision in selection.decisions:
            verdict = by_layer.get(decision.name)
            if verdict is None:
                continue
            decision.sparse = verdict.accepted
            gain = f"gain {verdict.gain_reason}"
            decision.reason = f"{verdict.reason}; {gain}" if verdict.gain > 0 else verdict.reason
            decision.rank = verdict.step
        selection.order = "choice"
        chosen = [n for i in outcome.accepted for n in units[i].layers]
        selection.ranking = chosen + [n for n in selection.ranking if n not in set(chosen)]
        selection.selected_macs = sum(d.macs for d in selection.decisions if d.sparse)
        state.masks = [m for m in state.masks if id(m) in kept]
