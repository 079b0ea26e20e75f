"""ApplyUnstructuredPruningPass: the seed papers' unstructured, data-free methods.

Why in the same tool: users compare RMT singular-vector pruning (seed 000) and the
PCA-guided spectral sparsifier (seed 003) with 2:4 on the same layers, with the same
reports (spectrum preservation, drift). These masks are unstructured — no TensorRT sparse
kernel runs them — so nodes are marked ``mpcompile.sparsity = "unstructured"``, never "2:4".
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from functools import partial

import numpy as np
import onnx_ir as ir

from mpcompile.errors import UsageError
from mpcompile.numerics.mp_law import MPFit
from mpcompile.numerics.spectral_prune import (
    magnitude_prune,
    rmt_layer_fractions,
    rmt_sv_prune,
    spectral_sample_prune,
)
from mpcompile.passes.gemm_discovery import GemmLayer
from mpcompile.passes.sparsify_24 import SPARSITY_KEY, LayerMask, write_matrix

__all__ = ["ApplyUnstructuredPruningPass", "UNSTRUCTURED_METHODS"]

logger = logging.getLogger(__name__)

UNSTRUCTURED_METHODS = ("rmt-sv", "spectral-sample", "magnitude-unstructured")


class ApplyUnstructuredPruningPass(ir.passes.InPlacePass):
    """Remove ``sparsity`` of the entries of the given layers' weights (size-weighted overall).

    Attributes:
        method: ``rmt-sv`` (per-layer budgets from bulk fraction γ and fit error μ, singular-
            vector sparsification below σ+) or ``spectral-sample`` (uniform budget, entries
            ranked by the rank-k principal component matrix, k = MP spikes), or
            ``magnitude-unstructured`` (the baseline: smallest |W| per layer, uniform budget).
        fits: MP fits by layer name (from the spectral pass).
    """

    def __init__(
        self,
        layers: list[GemmLayer],
        *,
        method: str,
        sparsity: float,
        fits: dict[str, MPFit],
        progress: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()
        if method not in UNSTRUCTURED_METHODS:
            raise UsageError(f"unstructured method must be one of {UNSTRUCTURED_METHODS}, got {method!r}")
        if not 0.0 <= sparsity < 1.0:
            raise UsageError(f"--sparsity must be in [0, 1), got {sparsity}")
        self.layers, self.method, self.sparsity, self.fits = layers, method, sparsity, fits
        self.progress = progress
        self.results: list[LayerMask] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        unique = list({id(layer.weight.root): layer for layer in self.layers}.values())
        fits = [self.fits[layer.name] for layer in unique]
        if self.method == "rmt-sv":
            fractions = rmt_layer_fractions(fits, self.sparsity)
        else:
            fractions = np.full(len(unique), self.sparsity)
        self.results = []
        for layer, fit, fraction in zip(unique, fits, fractions):
            before = layer.weight.stored_tensor()
            dense = layer.matrix()
            if self.method == "rmt-sv":
                pruned = rmt_sv_prune(dense, float(fraction), fit=fit)
            elif self.method == "magnitude-unstructured":
                pruned = magnitude_prune(dense, float(fraction))
            else:
                pruned = spectral_sample_prune(dense, float(fraction), rank=max(1, fit.spikes))
            sparse = pruned.weight.astype(np.float32)
            write_matrix(layer, sparse)
            for reader in (l for l in self.layers if l.weight.root is layer.weight.root):
                reader.node.metadata_props[SPARSITY_KEY] = "unstructured"
                reader.node.metadata_props["mpcompile.method"] = self.method
                reader.node.metadata_props["mpcompile.removed_fraction"] = f"{pruned.removed_fraction:.4f}"
            kept = float(np.abs(pruned.weight).sum() / max(np.abs(dense).sum(), 1e-300))
            self.results.append(LayerMask(layer.name, self.method, False, kept, partial(layer.matrix_of, before), sparse))
            if self.progress is not None:
                self.progress(layer.name)
        logger.info("%s: pruned %d weights to %.0f%% overall", self.method, len(unique), 100 * self.sparsity)
        return ir.passes.PassResult(model, modified=bool(self.results))
