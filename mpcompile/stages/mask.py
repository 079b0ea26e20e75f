"""Stage ``mask`` (layer-wise): the 2:4 (or unstructured) masks, written into the model.

The graph rewrite is an onnx_ir pass (``passes/sparsify_24.py``,
``passes/unstructured_prune.py``); this stage hands it the statistics and the masks the
permutation judge already computed, and takes both back from the state so each layer's
input covariance (K² floats) is freed as soon as that layer is masked.
"""

from __future__ import annotations

from mpcompile.io.runner import release_freed_memory
from mpcompile.numerics.spectrum_change import spectrum_change
from mpcompile.passes.sparsify_24 import Apply24SparsityPass, LayerMask
from mpcompile.passes.unstructured_prune import ApplyUnstructuredPruningPass
from mpcompile.stages.options import DATA_METHODS
from mpcompile.stages.state import CompileState
from mpcompile.stages.streaming import open_spill, spill_layer, streams

__all__ = ["MaskStage", "layer_spectrum_change", "fits_of"]


def fits_of(state: CompileState) -> dict:
    return {a.name: a.fit for a in state.analysis.result.layers if a.fit is not None}


def layer_spectrum_change(mask: LayerMask, fits: dict) -> dict[str, float | int]:
    fit = fits.get(mask.layer)
    return spectrum_change(mask.dense, mask.sparse, dense_top=fit.top_singular_values if fit is not None else None,
                           sketch=fit is not None and fit.spectrum == "sketch")


class MaskStage:
    name = "mask"
    timing = "mask"

    def applies(self, state: CompileState) -> bool:
        return True

    def run(self, state: CompileState) -> None:
        opts, method = state.options, state.method
        layers = state.layers_in_scope()
        # The mask pass takes the statistics over and drops each layer's once it is masked.
        stats_by_name = {layer.name: state.stats_by_node.pop(layer.node) for layer in layers
                         if layer.node in state.stats_by_node}
        names = {layer.name for layer in layers}
        precomputed = {name: state.precomputed.pop(name) for name in list(state.precomputed) if name in names}
        keep_dense = opts.keep_dense or state.measured_order or opts.max_drift is not None
        fits = fits_of(state)

        spill = open_spill(state) if streams(state) else None
        by_name = {layer.name: layer for layer in layers}

        def settle(mask: LayerMask) -> None:
            """Seed 003's spectrum figures while the dense weight is at hand, then let it go:
            holding every pre-mask weight to the end of the stage doubled the model in memory.
            Streaming, the masked weight goes to disk too (``stages/streaming.py``)."""
            state.spectra[mask.layer] = layer_spectrum_change(mask, fits)
            mask.release_dense()
            if spill is not None:
                spill_layer(spill, by_name[mask.layer], mask)

        with state.progress(f"{method} masks", len(layers)) as advance:
            if state.unstructured:
                sparsify = ApplyUnstructuredPruningPass(layers, method=method, sparsity=opts.sparsity, fits=fits,
                                                        progress=advance)
                state.notes.append(f"{method} is unstructured ({100 * opts.sparsity:.0f}% of entries removed): "
                                   "no 2:4 kernel runs it, no speedup is modeled")
            else:
                sparsify = Apply24SparsityPass(layers, method=method,
                                               stats=stats_by_name if method in DATA_METHODS else None,
                                               progress=advance, after_each=None if keep_dense else settle,
                                               precomputed=precomputed)
            del stats_by_name, precomputed
            sparsify(state.model)
        state.masks.extend(sparsify.results)
        # The input covariances are spent: drop them before the stages that load the model
        # into ONNX Runtime again.
        sparsify.stats = {}
        release_freed_memory()
