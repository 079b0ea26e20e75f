"""Capturing per-layer input statistics: one ONNX Runtime pass exposes every layer's input,
whose rows accumulate into the layer's second moment (``numerics/layer_stats.py``).

Why apart from ``calibration.py``: that module reads and runs data; this one is the
calibrate stage's machinery (row sampling, conv unfolding, shared Gram keys, memory budget).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from scipy.linalg.blas import ssyrk

from mpcompile.errors import UsageError
from mpcompile.io.calibration import CalibrationData
from mpcompile.io.runner import ModelRunner, release_freed_memory, run_slice
from mpcompile.numerics.im2col import im2col_rows
from mpcompile.numerics.layer_stats import LayerStats, upper_row_start
from mpcompile.passes.gemm_discovery import GemmLayer

__all__ = ["MAX_ROWS_PER_SAMPLE", "capturable", "capture_layer_stats", "layer_rows"]

logger = logging.getLogger(__name__)

MAX_ROWS_PER_SAMPLE = 512  # random input rows kept per calibration sample and layer
CAPTURE_OUTPUT_BUDGET_BYTES = 128 * 2**20  # exposed layer inputs of one capture batch
GRAM_BLOCK_ROWS = 512  # band height of the covariance accumulation
def _conv_geometry(node: ir.Node, x_shape: tuple[int, ...], kernel: tuple[int, ...]) -> dict:
    strides = tuple(node.attributes.get_ints("strides", None) or (1,) * len(kernel))
    dilations = tuple(node.attributes.get_ints("dilations", None) or (1,) * len(kernel))
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    pads = tuple(node.attributes.get_ints("pads", None) or (0,) * (2 * len(kernel)))
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads_begin, pads_end = [], []
        for size, k, s, d in zip(x_shape[2:], kernel, strides, dilations):
            out = -(-size // s)
            total = max(0, (out - 1) * s + d * (k - 1) + 1 - size)
            small, big = total // 2, total - total // 2
            pads_begin.append(small if auto_pad == "SAME_UPPER" else big)
            pads_end.append(big if auto_pad == "SAME_UPPER" else small)
        pads = (*pads_begin, *pads_end)
    elif auto_pad == "VALID":
        pads = (0,) * (2 * len(kernel))
    return {"strides": strides, "pads": pads, "dilations": dilations}


def layer_rows(layer: GemmLayer, x: np.ndarray, rng: np.random.Generator, max_rows: int) -> np.ndarray:
    """The layer's input as ``[rows, K]`` in TensorRT order, at most ``max_rows`` random rows."""
    if layer.op_type == "Conv":
        if x.ndim != 4 or len(layer.kernel) != 2:
            raise UsageError(f"{layer.name}: only 2-D convolutions are supported for calibration")
        geometry = _conv_geometry(layer.node, x.shape, layer.kernel)
        top, left, bottom, right = geometry["pads"]
        rows = im2col_rows(
            x, layer.kernel, strides=geometry["strides"], pads=(top, left, bottom, right),
            dilations=geometry["dilations"],
        )
    else:
        if layer.op_type == "Gemm" and layer.node.attributes.get_int("transA", 0):
            x = x.T
        rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > max_rows:
        rows = rows[np.sort(rng.choice(rows.shape[0], size=max_rows, replace=False))]
    return np.asarray(rows, dtype=np.float32)


def capture_layer_stats(
    model: ir.Model,
    layers: list[GemmLayer],
    data: CalibrationData,
    *,
    batch_size: int = 8,
    max_rows_per_sample: int = MAX_ROWS_PER_SAMPLE,
    seed: int = 0,
    output_budget_bytes: int = CAPTURE_OUTPUT_BUDGET_BYTES,
    progress: Callable[[str], None] | None = None,
    graph_outputs: list[list[np.ndarray]] | None = None,
) -> dict[str, LayerStats]:
    """``LayerStats`` (Gram of the input rows in TensorRT order) for each layer, by name.

    One pass of ONNX Runtime over the calibration data exposes every layer's input. Layers
    reading the same tensor share the capture. The batch is sized so the exposed tensors of
    one batch stay within ``output_budget_bytes`` (measured on a first one-sample batch): the
    Gram matrices are kept until masking anyway, so splitting the layers over several passes
    would cost time and save nothing. At most ``max_rows_per_sample`` random rows per sample
    are kept (conv rows via im2col), bounding time on big feature maps. Given a list,
    ``graph_outputs`` receives the model's outputs over the same samples (what
    :func:`run_model` returns), saving the pass that would compute them.

    Layers inside If/Loop/Scan bodies are captured when their input is a top-level value the
    body reads from the outer scope (ONNX Runtime can expose it as a graph output); a layer
    whose input is computed inside the body (a loop-carried state, a scan slice) gets no
    entry, since ONNX Runtime cannot expose values inside a subgraph (see :func:`capturable`).
    """
    rng = np.random.default_rng(seed)
    skipped = [layer for layer in layers if not capturable(model, layer)]
    if skipped:
        logger.info("no calibration capture for %d layer(s) whose input lives inside a subgraph: %s",
                    len(skipped), ", ".join(layer.name for layer in skipped))
        layers = [layer for layer in layers if capturable(model, layer)]
    inputs = [layer.node.inputs[0] for layer in layers]
    runner = ModelRunner(model, inputs)
    names = list(dict.fromkeys(v.name for v in inputs))
    output_names = [v.name for v in model.graph.outputs] if graph_outputs is not None else []
    output_parts: dict[str, list[np.ndarray]] = {name: [] for name in output_names}
    readers: dict[str, GemmLayer] = {}
    for layer in layers:  # the first layer of each key extracts the rows for all of them
        readers.setdefault(_capture_key(layer), layer)
    # float32 sums of upper triangles (each batch's product is symmetric): a quarter of the
    # memory of full float64 matrices, at a relative error ~1e-6, far below what the masks'
    # damping tolerates. Only one full K×K product exists at a time.
    sums = {key: np.zeros(layer.reduction * (layer.reduction + 1) // 2, np.float32)
            for key, layer in readers.items()}
    counts = dict.fromkeys(sums, 0)
    size = data.static_batch or 1
    stop = data.require_covered()
    fetched = list(dict.fromkeys([*names, *output_names]))
    start = 0
    while start < stop:
        take = min(size, stop - start)
        fetched_arrays = run_slice(runner, data, start, start + take, fetched)
        if fetched_arrays is None:  # the model runs one sample at a time: this slice again
            size = 1
            continue
        outputs = dict(zip(fetched, fetched_arrays))
        for name in output_names:
            output_parts[name].append(outputs[name])
        for key, layer in readers.items():
            rows = layer_rows(layer, outputs[layer.node.inputs[0].name], rng, max_rows_per_sample * take)
            if rows.shape[1] != layer.reduction:
                raise UsageError(
                    f"{layer.name}: captured input has {rows.shape[1]} columns, expected K={layer.reduction}"
                )
            _add_upper_gram(sums[key], rows)
            counts[key] += rows.shape[0]
        if start == 0 and not data.static_batch:
            per_sample = sum(outputs[name].nbytes for name in names) / take
            size = int(max(1, min(batch_size, output_budget_bytes // max(per_sample, 1))))
        del outputs
        start += take
    del runner
    if graph_outputs is not None:
        graph_outputs.extend(np.concatenate(output_parts.pop(name)) for name in output_names)
    shared = {}
    for key, total in sums.items():  # kept compact: float32 upper triangles (19 MB at K = 3072)
        total /= np.float32(max(counts[key], 1))
        shared[key] = LayerStats.from_upper(total, readers[key].reduction, counts[key])
    del sums
    release_freed_memory()
    result = {}
    for layer in layers:
        result[layer.name] = shared[_capture_key(layer)]
        if progress is not None:
            progress(layer.name)
    return result


def capturable(model: ir.Model, layer: GemmLayer) -> bool:
    """Whether ``layer``'s input can be exposed as a graph output of ``model``.

    True for top-level layers and for subgraph layers whose input is a top-level value
    captured by the body (the same tensor the layer reads on every run or iteration of the
    body; for an If branch, the input it sees whenever that branch runs). False when the input
    is computed inside a body, which ONNX Runtime cannot return.
    """
    value = layer.node.inputs[0]
    return value is not None and value.graph is model.graph


def _add_upper_gram(upper: np.ndarray, rows: np.ndarray, block: int = GRAM_BLOCK_ROWS) -> None:
    """Add the upper triangle of ``rowsᵀ rows`` to ``upper`` (row-major packed), a band of
    ``block`` rows at a time: no ``K×K`` temporary (85 MB at K = 4608), about half the flops.
    """
    k = rows.shape[1]
    if k <= block:  # small: BLAS syrk (one triangle); its Fortran-ordered lower triangle is
        # the upper one of a C-ordered view, which the extraction reads contiguously.
        upper += LayerStats.upper_of(ssyrk(1.0, rows.T, trans=0, lower=1).T)
        return
    for i0 in range(0, k, block):
        i1 = min(i0 + block, k)
        band = rows[:, i0:i1].T @ rows[:, i0:]  # [i1-i0, k-i0]: rows i0..i1 from the diagonal on
        keep = np.triu(np.ones(band.shape, dtype=bool))
        upper[upper_row_start(i0, k) : upper_row_start(i1, k)] += band[keep]


def _capture_key(layer: GemmLayer) -> str:
    """Layers with the same key see identical input rows, so they share one Gram matrix."""
    if layer.op_type == "Conv" or (layer.op_type == "Gemm" and layer.node.attributes.get_int("transA", 0)):
        return f"layer:{layer.name}"
    return f"input:{layer.node.inputs[0].name}"
