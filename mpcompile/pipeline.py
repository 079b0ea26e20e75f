"""The compile pipeline: analyze → select → calibrate → permute → mask → emit → check → validate.

Each stage is library code that can run alone; this module only sequences them and
collects what the report needs. Stages that need data use the user's calibration set, or a
synthetic one that every report names as such.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from mpcompile.analyze import Analysis, AnalyzeOptions, analyze_loaded
from mpcompile.calibration import (
    CalibrationData,
    capture_layer_stats,
    load_calibration,
    release_freed_memory,
    run_model,
    shapes_from_calibration,
    synthetic_inputs,
)
from mpcompile.errors import UnsupportedModelError, UsageError
from mpcompile.model_checks import dense_model_errors, require_finite, require_finite_inputs
from mpcompile.model_io import EXTERNAL_DATA_THRESHOLD, default_output_path, load_model
from mpcompile.numerics.masks import MASK_METHODS, LayerStats, PackedMaskResult
from mpcompile.numerics.spectrum_change import spectrum_change
from mpcompile.outputs import RunOutputs, protected_files
from mpcompile.passes.gemm_discovery import GemmLayer, discover_gemms
from mpcompile.passes.sparsify_24 import Apply24SparsityPass, LayerMask, restore_dense, write_matrix
from mpcompile.passes.unstructured_prune import UNSTRUCTURED_METHODS, ApplyUnstructuredPruningPass
from mpcompile.selection import MEASURED_ORDERS, Selection, rank_by_measurement, select_layers
from mpcompile.shapes import ShapeSpec
from mpcompile.validate import OutputComparison, compare_all_outputs, relative_drift

__all__ = ["CompileOptions", "CompileResult", "ProgressFactory", "compile_model"]

logger = logging.getLogger(__name__)

DATA_METHODS = {"cast", "cast-obs", "wanda", "sparsegpt", "admm"}
# (description, total) -> context manager yielding advance(label)
ProgressFactory = Callable[[str, int], AbstractContextManager[Callable[[str], None]]]


def _no_progress(_description: str, _total: int) -> AbstractContextManager[Callable[[str], None]]:
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
    order: str = "mp"
    exclude: tuple[str, ...] = ()
    only_profitable: str | None = None  # GPU name: keep dense what TensorRT is predicted to run dense there
    calib: str | None = None
    eval_data: str | None = None
    calib_samples: int = 256
    synthetic_samples: int = 16
    batch_size: int = 8
    conv: str = "native"
    fp16: bool = False
    output: str | None = None
    # Replace an existing output. The Python API does (as it always has); the CLI asks for --force.
    force: bool = True
    seed: int = 0
    # Keep each masked layer's dense weight reachable from the result (``LayerMask.dense``):
    # the Python API needs it to carry masks back to torch. The CLI releases it once the
    # report's spectra are computed, which saves one copy of the model's GEMM weights.
    keep_dense: bool = True
    analyze: AnalyzeOptions = field(default_factory=AnalyzeOptions)
    shape_spec: ShapeSpec = field(default_factory=ShapeSpec)
    # Shape sets the modeled speedup is reported at (``--dim batch=1,8,32``); empty: shape_spec.
    speedup_shape_specs: list[ShapeSpec] = field(default_factory=list)


@dataclass
class PermutationRecord:
    layers: list[str]
    folded: bool
    reason: str
    efficacy: float | None = None
    kept_before: float | None = None
    kept_after: float | None = None
    gather_inserted: bool = False


@dataclass
class CompileResult:
    input_path: Path
    output_path: Path
    analysis: Analysis
    selection: Selection
    method: str
    calibration_source: str
    masks: list[LayerMask]
    permutations: list[PermutationRecord]
    check_ok: bool
    check: Any
    validation: OutputComparison | None
    eval_source: str | None
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)
    speedup: list[dict[str, Any]] = field(default_factory=list)
    output_files: list[Any] = field(default_factory=list)
    """:class:`~mpcompile.outputs.FileRecord` of every file the output model consists of."""
    committed: bool = True
    """False when the check failed: then nothing was written under the output's final name."""
    _spectra: dict[str, dict[str, float | int]] | None = field(default=None, repr=False)

    def spectra(self) -> dict[str, dict[str, float | int]]:
        """Spectrum preservation per masked layer (computed once, shared by report and table)."""
        if self._spectra is None:
            self._spectra = {m.layer: spectrum_change(m.dense, m.sparse) for m in self.masks}
        return self._spectra

    def to_dict(self) -> dict[str, Any]:
        from mpcompile.report import report_header

        masks = {m.layer: m for m in self.masks}
        spectra = self.spectra()
        layers = []
        for decision, analysis in zip(self.selection.decisions, self.analysis.result.layers):
            record = analysis.to_dict()
            record["sparse"] = decision.sparse
            record["decision"] = decision.reason
            mask = masks.get(decision.name)
            if mask is None and decision.sparse:  # a weight shared by several layers is masked once
                mask = next((masks[n] for n in analysis.layer.shared_with if n in masks), None)
            if mask is not None:
                record["method"] = mask.method
                record["calibrated"] = mask.calibrated
                record["kept_magnitude_fraction"] = mask.kept_magnitude_fraction
                record["spectrum"] = spectra[mask.layer]
            layers.append(record)
        return report_header(
            "compile",
            self.input_path,
            output={"path": str(self.output_path), "files": [f.to_dict() for f in self.output_files]},
            shapes=self.analysis.shape_spec.describe(),
            method=self.method,
            calibration=self.calibration_source,
            evaluation=self.eval_source,
            selection={
                "order": self.selection.order,
                "target": self.selection.target,
                "eligible_macs": self.selection.eligible_macs,
                "sparse_macs": self.selection.selected_macs,
                "sparse_fraction_of_eligible": self.selection.selected_fraction,
                "sparse_layers": len(self.selection.selected_names),
            },
            check={"ok": self.check_ok, **(self.check.to_dict() if self.check is not None else {})},
            validation=self.validation.to_dict() if self.validation else None,
            permutations=[vars(p) for p in self.permutations],
            speedup=self.speedup,
            seconds=self.seconds,
            notes=self.notes,
            summary=self.analysis.result.summary(),
            layers=layers,
        )


def _spectrum_change(mask: LayerMask, fits: dict) -> dict[str, float | int]:
    fit = fits.get(mask.layer)
    return spectrum_change(mask.dense, mask.sparse, dense_top=fit.top_singular_values if fit is not None else None)


def _resolve_method(options: CompileOptions, has_data: bool) -> str:
    method = options.method or ("cast-obs" if has_data else "magnitude")
    if method not in MASK_METHODS and method not in UNSTRUCTURED_METHODS:
        raise UsageError(
            f"--method must be one of {sorted([*MASK_METHODS, *UNSTRUCTURED_METHODS])}, got {method!r}"
        )
    return method


def _load_data(options: CompileOptions, model: ir.Model) -> tuple[CalibrationData, bool]:
    if options.calib:
        return load_calibration(options.calib, model, limit=options.calib_samples), True
    return synthetic_inputs(model, options.shape_spec, options.synthetic_samples, options.seed), False


def compile_model(
    path: str | os.PathLike,
    options: CompileOptions | None = None,
    progress: ProgressFactory = _no_progress,
    outputs: RunOutputs | None = None,
) -> CompileResult:
    """Run the whole pipeline on ``path`` and write the sparse model (never over the input).

    The model is staged, checked and validated before it takes its final name, and only when
    the independent check passes (``result.committed``). A caller passing ``outputs`` (the CLI,
    which adds its reports to the same run) commits them itself.
    """
    opts = options or CompileOptions()
    if outputs is not None:
        return _compile_into(path, opts, progress, outputs)
    with RunOutputs([path], force=opts.force) as own:
        result = _compile_into(path, opts, progress, own)
        if result.committed:
            own.commit()
        return result


def _compile_into(path: str | os.PathLike, opts: CompileOptions, progress: ProgressFactory,
                  files: RunOutputs) -> CompileResult:
    """The pipeline, writing into ``files`` (staged; the caller commits)."""
    if opts.conv not in ("native", "im2col"):
        raise UsageError(f"--conv must be 'native' or 'im2col', got {opts.conv!r}")
    if opts.perm_steps is not None and opts.perm_steps < 0:
        raise UsageError(f"--perm-steps must be >= 0, got {opts.perm_steps}")
    if opts.perm_time_budget < 0:
        raise UsageError(f"--perm-time must be >= 0 seconds, got {opts.perm_time_budget:g}")
    timings: dict[str, float] = {}
    notes: list[str] = []
    t0 = time.perf_counter()
    files.protect([path, opts.calib, opts.eval_data])
    out_path = Path(opts.output) if opts.output else default_output_path(Path(path).resolve(), "sparse")
    out_path = files.add(out_path, "-o")
    loaded = load_model(path)
    files.protect(protected_files(loaded.path, loaded.proto))
    input_external = any(t.data_location == 1 for t in loaded.proto.graph.initializer)
    from mpcompile.user_checks import check_dim_names

    check_dim_names(loaded.model, opts.shape_spec.dims)

    data, from_user = _load_data(opts, loaded.model)
    require_finite_inputs(data)
    # With --calib, dynamic dims (sequence length, image size) are those of the data.
    spec = shapes_from_calibration(opts.shape_spec, loaded.model, data) if from_user else opts.shape_spec
    layers_total = len({id(layer.weight.root) for layer in discover_gemms(loaded.model)})
    with progress("MP fit", layers_total) as advance:
        analysis = analyze_loaded(loaded, spec, opts.analyze, advance)
    timings["analyze"] = time.perf_counter() - t0
    from mpcompile.user_checks import check_layer_names

    check_layer_names("--exclude", opts.exclude, [a.name for a in analysis.result.layers])

    eval_data, eval_source = data, data.source
    if opts.eval_data:
        eval_data = load_calibration(opts.eval_data, loaded.model)
        eval_source = f"file:{opts.eval_data}"
        require_finite_inputs(eval_data)
    method = _resolve_method(opts, from_user or opts.method in DATA_METHODS)
    unstructured = method in UNSTRUCTURED_METHODS
    # Dense reference outputs before any rewrite: cheaper than keeping a copy of the model.
    # When calibration runs over the evaluation data, its pass gives them.
    from_capture = eval_data is data and method in DATA_METHODS and not unstructured
    t = time.perf_counter()
    with dense_model_errors():
        dense_eval_all = None if from_capture else run_model(loaded.model, eval_data, opts.batch_size)
        dense_eval_out = None if dense_eval_all is None else dense_eval_all[0]
        dense_calib_out = (
            dense_eval_out if eval_data is data
            else run_model(loaded.model, data, opts.batch_size)[0] if opts.max_drift is not None else None
        )
        measured_order = opts.order in MEASURED_ORDERS
        drift_sample = _subset(data, DRIFT_ORDER_SAMPLES) if measured_order else None
        dense_sample_out = (run_model(loaded.model, drift_sample, opts.batch_size)[0]
                            if drift_sample is not None else None)
    if dense_eval_out is not None:
        require_finite(dense_eval_out, f"the input model's output on {eval_source}")
    timings["validate"] = time.perf_counter() - t
    if not from_user:
        notes.append(f"no --calib given: calibration and validation use {data.source}")
    elif eval_data is data:
        notes.append("no --eval-data given: validation reuses the calibration set, so its figures are "
                     "on data the masks were fitted to")

    # A measured order masks every candidate first and trims to the target afterwards.
    target = 1.0 if opts.max_drift is not None or measured_order else opts.target
    unprofitable: dict[str, str] = {}
    if opts.only_profitable:
        from mpcompile.speedup import unprofitable_layers

        unprofitable = unprofitable_layers(analysis.result.layers, opts.only_profitable, analysis.shapes)
        notes.append(f"--only-profitable {opts.only_profitable}: {len(unprofitable)} eligible layers kept dense, "
                     "predicted to run dense in TensorRT there (modeled, see each layer's reason)")
    selection = select_layers(analysis.result, target=target, order=opts.order,
                              exclude=set(opts.exclude) | set(unprofitable))
    for decision in selection.decisions:
        if decision.name in unprofitable and decision.name not in opts.exclude:
            decision.reason = f"kept dense: predicted to run dense on {opts.only_profitable} ({unprofitable[decision.name]})"
    if not selection.selected_names and opts.target > 0:
        if unprofitable:
            raise UnsupportedModelError(f"no layer is predicted to run sparse on {opts.only_profitable} "
                                        f"({len(unprofitable)} eligible, all too small or memory bound); "
                                        "drop --only-profitable to prune anyway")
        raise UnsupportedModelError("no layer is eligible for 2:4 (see `mpcompile analyze` for the reasons)")
    model = loaded.model
    layers = {a.layer.node: a.layer for a in analysis.result.layers}
    selected = [a.layer for a in analysis.result.layers if a.name in set(selection.selected_names)]

    if unstructured and (opts.max_drift is not None or opts.conv == "im2col" or measured_order):
        raise UsageError(f"--method {method} is unstructured: --max-drift, --order {' '.join(MEASURED_ORDERS)} "
                         "and --conv im2col apply to 2:4 only")
    t = time.perf_counter()
    stats_by_node: dict[ir.Node, LayerStats] = {}
    # Statistics only matter to data-aware masks (and to judging permutations under them);
    # magnitude permutations score |W| alone, so no capture pass is spent for them.
    if not unstructured and method in DATA_METHODS:
        with progress("calibration", len(selected)) as advance:
            outputs: list[np.ndarray] = []
            with dense_model_errors():
                captured = capture_layer_stats(model, selected, data, batch_size=min(opts.batch_size, 8),
                                               seed=opts.seed, progress=advance,
                                               graph_outputs=outputs if from_capture else None)
        stats_by_node = {layer.node: captured.pop(layer.name) for layer in selected if layer.name in captured}
        uncaptured = [layer.name for layer in selected if layer.node not in stats_by_node]
        if uncaptured:
            notes.append(
                f"{len(uncaptured)} layer(s) inside If/Loop/Scan bodies read a value computed in the "
                "body, which ONNX Runtime cannot expose: they got data-free magnitude 2:4 masks "
                f"(calibrated: false): {', '.join(uncaptured)}")
        if from_capture:
            dense_eval_all = outputs
            dense_eval_out = outputs[0]
            dense_calib_out = dense_eval_out
            require_finite(dense_eval_out, f"the input model's output on {eval_source}")
    timings["calibrate"] = time.perf_counter() - t

    t = time.perf_counter()
    permutations: list[PermutationRecord] = []
    precomputed: dict[str, PackedMaskResult] = {}  # masks the permutation judge already computed
    if opts.permute and not unstructured:
        permutations = _permute(model, selected, list(layers.values()), stats_by_node, method, opts, progress,
                                precomputed)
        # folds may create new initializers: rediscover so every layer reads the current weights
        rediscovered = {layer.node: layer for layer in discover_gemms(model, analysis.shapes)}
        selected = [rediscovered[layer.node] for layer in selected]
    timings["permute"] = time.perf_counter() - t

    t = time.perf_counter()
    # The mask pass takes the statistics over and drops each layer's once it is masked.
    stats_by_name = {layer.name: stats_by_node[layer.node] for layer in selected if layer.node in stats_by_node}
    stats_by_node.clear()
    keep_dense = opts.keep_dense or measured_order or opts.max_drift is not None
    spectra: dict[str, dict[str, float | int]] = {}
    fits = {a.name: a.fit for a in analysis.result.layers if a.fit is not None}

    def settle(mask: LayerMask) -> None:
        """Seed 003's spectrum figures while the dense weight is at hand, then let it go:
        holding every pre-mask weight to the end of the stage doubled the model in memory."""
        spectra[mask.layer] = _spectrum_change(mask, fits)
        mask.release_dense()

    with progress(f"{method} masks", len(selected)) as advance:
        if unstructured:
            sparsify = ApplyUnstructuredPruningPass(selected, method=method, sparsity=opts.sparsity, fits=fits,
                                                    progress=advance)
            notes.append(f"{method} is unstructured ({100 * opts.sparsity:.0f}% of entries removed): "
                         "no 2:4 kernel runs it, no speedup is modeled")
        else:
            sparsify = Apply24SparsityPass(selected, method=method,
                                           stats=stats_by_name if method in DATA_METHODS else None, progress=advance,
                                           after_each=None if keep_dense else settle, precomputed=precomputed)
        del stats_by_name, precomputed
        sparsify(model)
    timings["mask"] = time.perf_counter() - t

    masks = sparsify.results
    # The input covariances (K² per layer) are spent: drop them before the stages that load
    # the model into ONNX Runtime again.
    sparsify.stats = {}
    release_freed_memory()
    if measured_order:
        t = time.perf_counter()
        masks = _rank_by_drift(model, dense_sample_out, drift_sample, selected, masks, selection, opts, progress)
        notes.append(f"--order {opts.order}: layers ranked by the relative output drift each causes alone on "
                     f"{drift_sample.samples} samples of {data.source}, per MAC")
        timings["drift_order"] = time.perf_counter() - t
    if opts.max_drift is not None:
        t = time.perf_counter()
        masks = _fit_drift_budget(model, dense_calib_out, selected, masks, selection, data, opts, notes)
        timings["drift_search"] = time.perf_counter() - t

    if opts.conv == "im2col":
        from mpcompile.passes.im2col_lowering import LowerConvToIm2colPass

        LowerConvToIm2colPass([layer.node for layer in selected if layer.op_type == "Conv"])(model)
    if opts.fp16:
        from mpcompile.passes.fp16 import ConvertToFloat16Pass

        ConvertToFloat16Pass()(model)

    # Seed 003's spectrum-preservation figures of the layers the mask pass did not settle.
    t = time.perf_counter()
    spectra = {m.layer: spectra[m.layer] if m.layer in spectra else _spectrum_change(m, fits) for m in masks}
    if not opts.keep_dense:
        for mask in masks:
            mask.release_dense()
    release_freed_memory()
    timings["spectra"] = time.perf_counter() - t

    t = time.perf_counter()
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    staged = files.save_model(model, out_path, external_data=input_external or weights > EXTERNAL_DATA_THRESHOLD)
    output_files = files.files(out_path)
    timings["write"] = time.perf_counter() - t

    t = time.perf_counter()
    from mpcompile.checker import check_model

    check = check_model(staged)
    check.path = str(out_path)
    timings["check"] = time.perf_counter() - t

    t = time.perf_counter()
    sparse_all = run_model(model, eval_data, opts.batch_size)
    names = [v.name for v in model.graph.outputs]
    validation = compare_all_outputs(names, dense_eval_all, sparse_all, eval_data.used_labels)
    if all(c.degenerate for c in validation.all_outputs):
        notes.append("validation not meaningful: the dense outputs are degenerate on this data ("
                     + "; ".join(f"'{c.output}': {c.degenerate}" for c in validation.all_outputs)
                     + "); pass real inputs with --eval-data or --calib")
    timings["validate"] += time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    from mpcompile.speedup import shape_set_speedups

    precision = "fp16" if opts.fp16 else "fp32"
    specs = opts.speedup_shape_specs if len(opts.speedup_shape_specs) > 1 else [analysis.shape_spec]
    speedup = [] if unstructured else shape_set_speedups(analysis, set(selection.selected_names), specs, precision)
    if speedup:
        notes.append(
            f"speedups are modeled (roofline from datasheet throughput, {precision.upper()} engine, at "
            f"{'; '.join(s.describe() for s in specs)}); measure with `mpcompile build` on a GPU"
        )
        if precision == "fp32":
            best = max(speedup, key=lambda e: e.get("fp16_speedup", 1.0))
            gain = best.get("fp16_speedup", 1.0)
            notes.append(
                "the output is FP32: a TensorRT 10+ strongly typed engine runs it without 2:4 kernels "
                "(modeled 1.00×); compile with --fp16 for a sparse engine"
                + (f" (modeled up to {gain:.2f}× on {best['gpu']} at FP16)" if gain > 1.005 else
                   " (at these shapes even FP16 is modeled 1.00×: layers too small or memory bound)"))
    if not check.ok:
        notes.append(f"the independent 2:4 check failed: nothing was written to {out_path}")
    return CompileResult(
        input_path=loaded.path,
        output_path=out_path,
        output_files=output_files,
        committed=check.ok,
        analysis=analysis,
        selection=selection,
        method=method,
        calibration_source=data.source,
        masks=masks,
        permutations=permutations,
        check_ok=check.ok,
        check=check,
        validation=validation,
        eval_source=eval_source,
        seconds={k: round(v, 3) for k, v in timings.items()},
        notes=notes,
        speedup=speedup,
        _spectra=spectra,
    )


def _scores(layer: GemmLayer, stats: LayerStats | None, method: str) -> np.ndarray:
    """Per-entry importance on the ``[rows, Cin]`` channel view the permutation acts on."""
    w = np.abs(layer.matrix().astype(np.float64))
    if stats is not None and stats.has_gram and method in DATA_METHODS:
        w = w * np.sqrt(np.maximum(stats.diagonal(), 0.0))[None, :]
    cin = layer.in_channels
    return w.reshape(-1, cin) if layer.op_type == "Conv" else w


@dataclass
class _Judgement:
    """What masking the consumers of one producer gives with and without a permutation."""

    gain: float | None
    """Relative drop of their calibration output error when permuted (None: no statistics)."""
    permuted_stats: dict[ir.Node, LayerStats] = field(default_factory=dict)
    """Their statistics in the permuted order (compact), to keep if the permutation is applied."""
    identity: dict[str, PackedMaskResult] = field(default_factory=dict)
    permuted: dict[str, PackedMaskResult] = field(default_factory=dict)
    """The mask results of each order by layer: the mask pass reuses the chosen ones."""


def _judge_permutation(consumers, perm, stats_by_node, method) -> _Judgement:
    """Mask the consumers with and without ``perm`` and compare their output errors.

    The search maximises kept importance, a proxy; what matters is the layer's output error
    under the chosen mask method, so a permutation is only applied when it lowers that.
    """
    from mpcompile.numerics.masks import apply_method, reconstruction_error

    before = after = 0.0
    judgement = _Judgement(None)
    for consumer in consumers:
        stats = stats_by_node.get(consumer.node)
        if stats is None or not stats.has_gram or method not in DATA_METHODS:
            return _Judgement(None)
        full = stats.expanded()  # read several times below: rebuild the full matrix once
        w = consumer.matrix()
        kperm = _k_permutation(consumer, perm)
        result = apply_method(method, w, full)
        before += reconstruction_error(w, result.weight, full, float32=True)
        judgement.identity[consumer.name] = result.packed(w)
        permuted = full.permuted(kperm)  # compact: no second full matrix
        result = apply_method(method, w[:, kperm], permuted)
        judgement.permuted[consumer.name] = result.packed(w[:, kperm])
        # The permuted layer's error, measured back in the original column order against the
        # full matrix already at hand: the same number, without a permuted copy of it.
        unpermuted = np.empty_like(result.weight)
        unpermuted[:, kperm] = result.weight
        del result
        after += reconstruction_error(w, unpermuted, full, float32=True)
        del full, unpermuted
        judgement.permuted_stats[consumer.node] = permuted
    judgement.gain = (before - after) / before if before > 0 else 0.0
    return judgement


def _k_permutation(layer: GemmLayer, perm: np.ndarray) -> np.ndarray:
    """Lift a Cin permutation to the full reduction axis ``(kh, kw, Cin)``."""
    if layer.op_type != "Conv":
        return perm
    positions = layer.reduction // layer.in_channels
    return (np.arange(positions)[:, None] * layer.in_channels + perm[None, :]).ravel()


def _permute(model, selected, all_layers, stats_by_node, method, opts, progress,
             precomputed: dict[str, PackedMaskResult]) -> list[PermutationRecord]:
    """Channel permutations for the selected layers, grouped by the producer they fold into.

    The searches are independent (a fold permutes a producer's rows, which no column search
    sees), so they all run first, in parallel; the judging and folding then go in graph order.
    """
    from mpcompile.numerics.permutation import search_permutations
    from mpcompile.passes.permute_channels import SUBGRAPH_REASON, apply_fold, insert_gather, plan_fold

    records: list[PermutationRecord | None] = []
    done: set[ir.Node] = set()
    selected_nodes = {layer.node for layer in selected}
    groups: dict[int, tuple] = {}  # record index -> (plan, consumers)
    problems: dict[int, np.ndarray] = {}
    with progress("channel permutation", len(selected)) as advance:
        for layer in selected:
            if layer.node in done:
                continue
            plan = plan_fold(model, layer, all_layers)
            consumers = plan.consumers or [layer]
            names = [c.name for c in consumers]
            done.update(c.node for c in consumers)
            if any(c.node not in selected_nodes for c in consumers):
                records.append(PermutationRecord(names, False, "siblings reading the same tensor are not all selected"))
                advance(layer.name)
                continue
            if not plan.foldable and (not opts.allow_gather or plan.reason == SUBGRAPH_REASON):
                records.append(PermutationRecord(names, False, plan.reason))
                advance(layer.name)
                continue
            groups[len(records)] = (plan, consumers)
            # float32 halves what is held while the searches run (they search in float32)
            problems[len(records)] = np.concatenate(
                [_scores(c, stats_by_node.get(c.node), method) for c in consumers]).astype(np.float32)
            records.append(None)
        # With a step count the clock must not stop a search first (a slow machine would differ).
        budget = opts.perm_time_budget if opts.perm_steps is None else REPRODUCIBLE_SEARCH_CAP_S
        searches = search_permutations(problems, time_budget_s=budget, seed=opts.seed, max_iterations=opts.perm_steps,
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
        judgement = _judge_permutation(consumers, perm, stats_by_node, method)
        gain = judgement.gain
        if gain is not None and gain <= 0.0:
            record.reason = f"kept more |W| but did not lower the {method} output error ({gain:+.2%}); not applied"
            precomputed.update(judgement.identity)
            continue
        precomputed.update(judgement.permuted)
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
                kperm = _k_permutation(consumer, perm)
                stats_by_node[consumer.node] = stats.permuted(kperm)
    return records



DRIFT_ORDER_SAMPLES = 64
REPRODUCIBLE_SEARCH_CAP_S = 3600.0


def _subset(data: CalibrationData, samples: int) -> CalibrationData:
    """The first ``samples`` samples (whole static batches): enough to rank layers by drift."""
    count = min(data.samples, max(samples, data.static_batch or 0))
    labels = data.labels[:count] if data.labels is not None else None
    return CalibrationData(data.slice(0, count), data.source, labels, data.static_batch, data.shared)


def _weight_groups(selected: list[GemmLayer], masks: list[LayerMask]) -> dict[str, list[GemmLayer]]:
    """Layers sharing each mask's weight (a mask is named after the first of them)."""
    by_name = {layer.name: layer for layer in selected}
    return {m.layer: [layer for layer in selected if layer.weight.root is by_name[m.layer].weight.root] for m in masks}


def _rank_by_drift(model, dense_out, sample, selected, masks, selection, opts, progress) -> list[LayerMask]:
    """``--order drift``: make each candidate sparse alone, measure the output drift, keep the
    cheapest per MAC up to ``--target``.

    The MP rank predicts which layers tolerate 2:4; this measures it, at one ONNX Runtime pass
    per weight on a small sample. It sees each layer alone, not their interaction, which is
    what ``--max-drift`` (run over this order) then accounts for.
    """
    groups = _weight_groups(selected, masks)
    for mask in masks:
        write_matrix(groups[mask.layer][0], mask.dense)
    cost: dict[str, float] = {}
    with progress("drift per layer", len(masks)) as advance:
        for mask in masks:
            write_matrix(groups[mask.layer][0], mask.sparse)
            cost[mask.layer] = relative_drift(dense_out, run_model(model, sample, opts.batch_size)[0])
            write_matrix(groups[mask.layer][0], mask.dense)
            advance(mask.layer)
    target = 1.0 if opts.max_drift is not None else opts.target
    kept = rank_by_measurement(selection, cost, target, {k: [layer.name for layer in v] for k, v in groups.items()})
    by_layer = {m.layer: m for m in masks}
    for mask in masks:
        if mask.layer in kept:
            write_matrix(groups[mask.layer][0], mask.sparse)
        else:
            restore_dense(groups[mask.layer], mask.dense)
    return [by_layer[name] for name in kept]


def _fit_drift_budget(model, dense_out, selected, masks, selection, data, opts, notes) -> list[LayerMask]:
    """Largest prefix of the ranked layers whose output drift stays within ``--max-drift``.

    Masks were computed once for every candidate; each probe only swaps weights between their
    dense and sparse versions, so the search costs ~log2(L) ONNX Runtime passes.
    """
    by_name = {layer.name: layer for layer in selected}
    ranked = [m for name in selection.ranked_selected for m in masks if m.layer == name]
    groups = _weight_groups(selected, ranked)

    def drift_with(count: int) -> float:
        for index, mask in enumerate(ranked):
            write_matrix(by_name[mask.layer], mask.sparse if index < count else mask.dense)
        return relative_drift(dense_out, run_model(model, data, opts.batch_size)[0])

    lo, hi = 0, len(ranked)  # invariant: drift(lo) <= budget (lo = 0 is dense)
    if drift_with(hi) <= opts.max_drift:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if drift_with(mid) <= opts.max_drift:
            lo = mid
        else:
            hi = mid
    kept = ranked[:lo]
    for index, mask in enumerate(ranked):
        if index < lo:
            write_matrix(by_name[mask.layer], mask.sparse)
        else:
            restore_dense(groups[mask.layer], mask.dense)
    dropped = {layer.name for mask in ranked[lo:] for layer in groups[mask.layer]}
    for decision in selection.decisions:
        if decision.name in dropped:
            decision.sparse = False
            decision.reason = f"kept dense: adding it exceeds --max-drift {opts.max_drift}"
    selection.selected_macs = sum(d.macs for d in selection.decisions if d.sparse)
    notes.append(f"--max-drift {opts.max_drift}: {lo} of {len(ranked)} ranked weights made 2:4 "
                 f"(relative L2 drift on calibration data)")
    return kept
