"""Stage ``spectra``: seed 003's spectrum-preservation figures of the layers the mask stage
did not settle already, then (CLI) the dense weights are released."""

from __future__ import annotations

from mpcompile.io.runner import release_freed_memory
from mpcompile.stages.mask import fits_of, layer_spectrum_change
from mpcompile.stages.state import CompileState

__all__ = ["SpectraStage"]


class SpectraStage:
    name = "spectra"
    timing = "spectra"

    def applies(self, state: CompileState) -> bool:
        return True

    def run(self, state: CompileState) -> None:
        fits = fits_of(state)
        spectra = state.spectra
        state.spectra = {m.layer: spectra[m.layer] if m.layer in spectra else layer_spectrum_change(m, fits)
                         for m in state.masks}
        if not state.options.keep_dense:
            for mask in state.masks:
                mask.release_dense()
        release_freed_memory()
