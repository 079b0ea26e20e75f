"""Library entry point for the analysis stage: load → infer shapes → spectral pass.

The CLI, the Python API and the full pipeline all call :func:`analyze_model`, so the three
report exactly the same numbers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from mpcompile.checks.model_checks import require_usable_weights
from mpcompile.io.model_io import LoadedModel, load_model
from mpcompile.passes.fold_constant_weights import fold_constant_weight_reshapes
from mpcompile.passes.spectral_analysis import ANALYSIS_META_KEY, AnalysisResult, AnnotateSpectralPass
from mpcompile.io.shapes import ShapeSpec, infer_static_shapes

__all__ = ["AnalyzeOptions", "Analysis", "analyze_model", "analyze_loaded", "weights_to_analyze"]


@dataclass
class AnalyzeOptions:
    """Options of the spectral-analysis stage (see ``mpcompile analyze --help``)."""

    alpha: float = 0.25
    beta: float = 1.25
    s_d: float = 0.70
    sparsity: float = 0.5
    tw_confidence: float | None = 0.99
    annotate: bool = True
    spectrum: str = "exact"  # exact | sketch (see mpcompile.numerics.sketch_spectrum)
    workers: str = "local"  # local threads, or ray (see mpcompile.ray_fanout)
    ray_address: str | None = None


@dataclass
class Analysis:
    """A loaded model together with its analysis and the shapes used to count MACs."""

    loaded: LoadedModel
    result: AnalysisResult
    shape_spec: ShapeSpec
    shapes: dict[str, tuple[int, ...]]


def weights_to_analyze(loaded: LoadedModel) -> int:
    """How many distinct weights the spectral pass will fit: the progress bar's total.

    Why fold first: a weight reached through a Reshape of a constant is a layer only once
    folded, so a count taken before (as the bar once was) ended short of the work done.
    Folding is exact and idempotent; :func:`analyze_loaded` repeats it at no cost.
    """
    from mpcompile.passes.gemm_discovery import discover_gemms

    fold_constant_weight_reshapes(loaded.model)
    return len({id(layer.weight.root) for layer in discover_gemms(loaded.model)})


def analyze_loaded(
    loaded: LoadedModel,
    shape_spec: ShapeSpec | None = None,
    options: AnalyzeOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> Analysis:
    spec = shape_spec or ShapeSpec()
    opts = options or AnalyzeOptions()
    require_usable_weights(loaded.model)
    shapes = infer_static_shapes(loaded.proto, spec)
    # Paddle/TF exports reshape stored weights at run time: exact to fold, then ordinary layers.
    fold_constant_weight_reshapes(loaded.model)
    spectral = AnnotateSpectralPass(
        alpha=opts.alpha,
        beta=opts.beta,
        s_d=opts.s_d,
        sparsity=opts.sparsity,
        tw_confidence=opts.tw_confidence,
        annotate=opts.annotate,
        output_shapes=shapes,
        progress=progress,
        spectrum=opts.spectrum,
        workers=opts.workers,
        ray_address=opts.ray_address,
    )
    spectral(loaded.model)
    result = loaded.model.meta[ANALYSIS_META_KEY]
    return Analysis(loaded=loaded, result=result, shape_spec=spec, shapes=shapes)


def analyze_model(
    path: str | os.PathLike,
    shape_spec: ShapeSpec | None = None,
    options: AnalyzeOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> Analysis:
    """Load ``path`` (validated, read-only) and run the spectral analysis on it."""
    return analyze_loaded(load_model(path), shape_spec, options, progress)

