"""What the user asked for: :class:`CompileOptions` (``mpcompile compile --help``)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

from mpcompile.analyze import AnalyzeOptions
from mpcompile.io.shapes import ShapeSpec

__all__ = ["CALIBRATION_PROTOCOLS", "CompileOptions", "DATA_METHODS", "ProgressFactory", "no_progress"]

DATA_METHODS = {"cast", "cast-obs", "wanda", "sparsegpt", "admm"}
CALIBRATION_PROTOCOLS = ("sequential", "dense")
# (description, total) -> context manager yielding advance(label)
ProgressFactory = Callable[[str, int], AbstractContextManager[Callable[[str], None]]]


def no_progress(_description: str, _total: int) -> AbstractContextManager[Callable[[str], None]]:
    return nullcontext(lambda _label: None)


@dataclass
class CompileOptions:
    """Options of ``mpcompile compile`` (see its ``--help``)."""

    method: str | None = None  # default: cast-obs with calibration data, magnitude without
    permute: bool = True
    allow_gather: bool = False
    perm_time_budget: float = 0.5
    perm_steps: int | None = None  # reproducible searches: a step count instead of the clock
    target: float = 1.0
    max_drift: float | None = None
    sparsity: float = 0.5  # overall removed fraction for the unstructured methods (rmt-sv, spectral-sample)
    order: str | None = None  # None: "choice" with --max-drift and --calib, else "mp" (stages/choice.py)
    gpu: str | None = None  # --order choice: weigh layers by modeled time saved on this GPU (else by MACs)
    choice_prior: str = "mp"  # --order choice: what orders near-tied candidates ("graph": no MP prior)
    exclude: tuple[str, ...] = ()
    only_profitable: str | None = None  # GPU name: keep dense what TensorRT is predicted to run dense there
    calib: str | None = None
    eval_data: str | None = None
    calib_samples: int = 256
    synthetic_samples: int = 16
    batch_size: int = 8
    conv: str = "native"
    # sequential: each depth group of layers is calibrated on the model with the earlier groups
    # already 2:4 (the SparseGPT/Wanda reference protocol); dense: one pass over the dense model.
    calibration: str = "sequential"
    fp16: bool = False
    output: str | None = None
    # Replace an existing output. The Python API does (as it always has); the CLI asks for --force.
    force: bool = True
    seed: int = 0
    # Keep each masked layer's dense weight reachable from the result (``LayerMask.dense``):
    # the Python API needs it to carry masks back to torch. The CLI releases it once the
    # report's spectra are computed, which saves one copy of the model's GEMM weights.
    keep_dense: bool = True
    # Move each masked weight to a spill file as it is written (``stages/streaming.py``):
    # None streams models read with external data, True any model, False never.
    stream: bool | None = None
    analyze: AnalyzeOptions = field(default_factory=AnalyzeOptions)
    shape_spec: ShapeSpec = field(default_factory=ShapeSpec)
    # Shape sets the modeled speedup is reported at (``--dim batch=1,8,32``); empty: shape_spec.
    speedup_shape_specs: list[ShapeSpec] = field(default_factory=list)
