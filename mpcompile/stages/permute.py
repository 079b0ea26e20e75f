"""Stage ``permute`` (layer-wise): channel permutations, searched, judged, folded into producers.

The searches are independent (a fold permutes a producer's rows, which no column search
sees), so they all run first, in parallel; the judging (``permute_judge.py``) and folding
(``passes/permute_channels.py``) then go in graph order.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from mpcompile.passes.gemm_discovery import discover_gemms
from mpcompile.stages.permute_judge import judge_permutation, k_permutation, scores
from mpcompile.stages.state import CompileState, PermutationRecord

__all__ = ["PermuteStage", "REPRODUCIBLE_SEARCH_CAP_S"]

REPRODUCIBLE_SEARCH_CAP_S = 3600.0


class PermuteStage:
    name = "permute"
    timing = "permute"

    def applies(self, state: CompileState) -> bool:
        return True  # timed (0 s) even when off, as the report always listed it

    def run(self, state: CompileState) -> None:
        if not state.options.permute or state.unstructured:
            return
        all_layers = list({a.layer.node: a.layer for a in state.analysis.result.layers}.values())
        state.permutations.extend(self._permute(state, all_layers))
        # folds may create new initializers: rediscover so every layer reads the current weights
        state.replace_layers({layer.node: layer for layer in discover_gemms(state.model, state.analysis.shapes)})

    @staticmethod
    def _permute(state: CompileState, all_layers) -> list[PermutationRecord]:
        from mpcompile.numerics.permutation import search_permutations
        from mpcompile.passes.permute_channels import SUBGRAPH_REASON, apply_fold, insert_gather, plan_fold

        model, opts, method, stats_by_node = state.model, state.options, state.method, state.stats_by_node
        layers = state.layers_in_scope()
        records: list[PermutationRecord | None] = []
        done: set[ir.Node] = set()
        selected_nodes = {layer.node for layer in state.selected}
        masked = {m.layer for m in state.masks}
        masked.update(n for layer in state.selected if layer.name in masked for n in layer.shared_with)
        groups: dict[int, tuple] = {}  # record index -> (plan, consumers)
        problems: dict[int, np.ndarray] = {}
        with state.progress("channel permutation", len(layers)) as advance:
            for layer in layers:
                if layer.node in done:
                    continue
                plan = plan_fold(model, layer, all_layers)
                consumers = plan.consumers or [layer]
                names = [c.name for c in consumers]
                done.update(c.node for c in consumers)
                if any(c.name in masked for c in consumers):  # (sequential: chunks keep siblings together)
                    records.append(PermutationRecord(names, False, "a sibling reading the same tensor is already "
                                                                   "masked (an earlier calibration chunk)"))
                    advance(layer.name)
                    continue
                if any(c.node not in selected_nodes for c in consumers):
                    records.append(PermutationRecord(names, False,
                                                     "siblings reading the same tensor are not all selected"))
                    advance(layer.name)
                    continue
                if not plan.foldable and (not opts.allow_gather or plan.reason == SUBGRAPH_REASON):
                    records.append(PermutationRecord(names, False, plan.reason))
                    advance(layer.name)
                    continue
                groups[len(records)] = (plan, consumers)
                # float32 halves what is held while the searches run (they search in float32)
                problems[len(records)] = np.concatenate(
                    [scores(c, stats_by_node.get(c.node), method) for c in consumers]).astype(np.float32)
                records.append(None)
            # With a step count the clock must not stop a search first (a slow machine would differ).
            budget = opts.perm_time_budget if opts.perm_steps is None else REPRODUCIBLE_SEARCH_CAP_S
            searches = search_permutations(problems, time_budget_s=budget, seed=opts.seed,
                                           max_iterations=opts.perm_steps,
                                           on_done=lambda index: advance(groups[index][1][0].name))
            del problems
        for index, (plan, consumers) in groups.items():
            found = searches[index]
            record = PermutationRecord([c.name for c in consumers], False, "", found.efficacy, found.kept_before,
                                       found.kept_after)
            records[index] = record
            if found.kept_after <= found.kept_before + 1e-12:
                record.reason = "no permutation keeps more than identity"
                continue
            perm = np.asarray(found.perm)
            judgement = judge_permutation(consumers, perm, stats_by_node, method)
            gain = judgement.gain
            if gain is not None and gain <= 0.0:
                record.reason = f"kept more |W| but did not lower the {method} output error ({gain:+.2%}); not applied"
                state.precomputed.update(judgement.identity)
                continue
            state.precomputed.update(judgement.permuted)
            if plan.foldable:
                apply_fold(model, plan, perm)
                record.folded, record.reason = True, "folded into producer"
            else:
                insert_gather(model, plan, perm)
                record.gather_inserted, record.reason = True, f"explicit Gather inserted ({plan.reason})"
            for consumer in consumers:
                stats = stats_by_node.get(consumer.node)
                if consumer.node in judgement.permuted_stats:
                    stats_by_node[consumer.node] = judgement.permuted_stats[consumer.node]
                elif stats is not None and stats.has_gram:
                    stats_by_node[consumer.node] = stats.permuted(k_permutation(consumer, perm))
        return records
