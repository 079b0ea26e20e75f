"""Apply24SparsityPass: write N:M-masked weights back into the graph, in TensorRT order.

Why a pass of its own: the mask is computed on the ``[out, K]`` TensorRT view, but the
stored initializer may be ``[K, N]`` (MatMul), ``[N, K]`` (Gemm transB=1), a conv kernel, or
sit behind Transpose/Cast nodes. Mapping the matrix back through exactly the inverse of the
discovery view is what keeps groups of 4 on the axis TensorRT reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import onnx_ir as ir

from mpcompile.errors import UsageError
from mpcompile.numerics.masks import LayerStats, MaskResult, PackedMaskResult, apply_method
from mpcompile.passes.gemm_discovery import GemmLayer

__all__ = ["Apply24SparsityPass", "LayerMask", "matrix_to_stored", "write_matrix", "restore_dense", "SPARSITY_KEY"]

logger = logging.getLogger(__name__)

SPARSITY_KEY = "mpcompile.sparsity"


@dataclass
class LayerMask:
    """The outcome of masking one layer (one per stored weight; shared weights once)."""

    layer: str
    method: str
    calibrated: bool
    kept_magnitude_fraction: float
    dense_source: Callable[[], np.ndarray] | None = field(repr=False)
    """Reads the dense ``[out, K]`` weight on demand: from the tensor the layer held before
    masking (kept alive, not copied: on a loaded model it is already in memory or on disk)."""
    sparse: np.ndarray = field(repr=False)
    """The written ``[out, K]`` weight, sharing memory with the model's stored tensor."""

    @property
    def dense(self) -> np.ndarray:
        if self.dense_source is None:
            raise UsageError(f"the dense weight of {self.layer} was released after compile "
                             "(compile with keep_dense=True to keep it)")
        return self.dense_source()

    def release_dense(self) -> None:
        """Drop the reference to the pre-mask weight so its memory can be freed."""
        self.dense_source = None


def matrix_to_stored(matrix: np.ndarray, layer: GemmLayer, stored_shape: tuple[int, ...]) -> np.ndarray:
    """Invert ``weight_to_matrix`` and the Transpose chain: ``[out, K]`` → stored layout."""
    if layer.layout in ("matmul", "gemm_transB0"):
        effective = matrix.T
    elif layer.layout == "gemm_transB1":
        effective = matrix
    elif layer.layout == "conv":
        cout = matrix.shape[0]
        kernel = layer.kernel
        cin = layer.in_channels
        spatial_last = matrix.reshape(cout, *kernel, cin)
        order = (0, spatial_last.ndim - 1, *range(1, spatial_last.ndim - 1))
        effective = np.transpose(spatial_last, order)
    else:
        raise ValueError(f"unknown layout {layer.layout!r}")
    stored = effective
    for node in reversed(layer.weight.chain):
        if node.op_type == "Transpose":
            perm = node.attributes.get_ints("perm", None) or list(reversed(range(stored.ndim)))
            stored = np.transpose(stored, np.argsort(perm))
        elif node.op_type not in ("Cast", "Identity"):
            raise ValueError(f"{layer.name}: cannot write a weight back through {node.op_type}")
    if tuple(stored.shape) != tuple(stored_shape):
        raise ValueError(f"{layer.name}: mapped weight shape {stored.shape} != stored {stored_shape}")
    return stored


def _replace_stored(layer: GemmLayer, array: np.ndarray) -> None:
    root = layer.weight.root
    if root.const_value is not None and root.is_initializer():
        root.const_value = ir.tensor(array, name=root.name)
        return
    producer = root.producer()
    if producer is not None and producer.op_type == "Constant":
        producer.attributes["value"] = ir.AttrTensor("value", ir.tensor(array, name=root.name))
        return
    root.const_value = ir.tensor(array, name=root.name)


def write_matrix(layer: GemmLayer, matrix: np.ndarray) -> np.ndarray:
    """Store an ``[out, K]`` matrix as ``layer``'s weight, in its stored layout and dtype.

    Returns the ``[out, K]`` matrix as now held, sharing memory with the stored tensor: one
    copy of the weight exists either way. MatMul/Gemm weights are stored C-contiguous (the
    matrix returned is then a transposed view), because ONNX Runtime, fed the weights at every
    run, copies a non-contiguous array each time: the whole model again, per run.
    """
    stored = layer.weight.stored_tensor()
    dtype = stored.dtype.numpy()
    array = matrix_to_stored(matrix, layer, tuple(stored.shape)).astype(dtype, copy=False)
    plain = layer.op_type != "Conv" and not any(n.op_type == "Transpose" for n in layer.weight.chain)
    if plain and array.dtype == matrix.dtype and not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
        _replace_stored(layer, array)
        return array.T if layer.layout in ("matmul", "gemm_transB0") else array
    # Otherwise the stored tensor is a (transposed) view of ``matrix`` when the dtype matches.
    _replace_stored(layer, array)
    return matrix


def restore_dense(layers: list[GemmLayer], dense: np.ndarray) -> None:
    """Give layers (sharing one weight) their dense weight back and drop their 2:4 marks.

    Used when a pruned layer would not pay: over a drift budget, or TensorRT ran it dense
    anyway (accuracy for free).
    """
    write_matrix(layers[0], dense)
    for layer in layers:
        for key in (SPARSITY_KEY, "mpcompile.method", "mpcompile.calibrated"):
            layer.node.metadata_props.pop(key, None)


class Apply24SparsityPass(ir.passes.InPlacePass):
    """Mask the given layers N:M along their TensorRT reduction axis and mark the nodes.

    Attributes:
        layers: the layers to make sparse (eligible ones; a shared weight is masked once,
            with the merged statistics of every layer that reads it).
        method: magnitude / cast / wanda / sparsegpt.
        stats: calibration statistics by layer name (missing → data-free).
        n, m: the pattern (2:4 for TensorRT).
        progress: called with each layer name as it is done.
        after_each: called with each ``LayerMask`` as soon as it is written.
        precomputed: results already computed for the current weight of a layer that alone
            reads it (the permutation judge masks both orders), used instead of recomputing.
        Statistics are dropped from ``stats`` as their layers are masked.
    """

    def __init__(
        self,
        layers: list[GemmLayer],
        *,
        method: str = "magnitude",
        stats: dict[str, LayerStats] | None = None,
        n: int = 2,
        m: int = 4,
        progress: Callable[[str], None] | None = None,
        after_each: Callable[[LayerMask], None] | None = None,
        precomputed: dict[str, PackedMaskResult] | None = None,
    ) -> None:
        super().__init__()
        self.layers = layers
        self.method = method
        self.stats = stats if stats is not None else {}
        self.n, self.m = n, m
        self.progress = progress
        self.after_each = after_each
        self.precomputed = precomputed if precomputed is not None else {}
        self.results: list[LayerMask] = []

    def requires(self, model: ir.Model) -> None:
        bad = [layer.name for layer in self.layers if not layer.eligible]
        if bad:
            raise ir.passes.PreconditionError(f"layers not eligible for 2:4: {bad}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        by_root: dict[int, list[GemmLayer]] = {}
        for layer in self.layers:
            by_root.setdefault(id(layer.weight.root), []).append(layer)
        self.results = []
        for group in by_root.values():
            first = group[0]
            stats = self._merged_stats(group)
            for layer in group:  # each layer's statistics are spent once its weight is masked
                self.stats.pop(layer.name, None)
            before = first.weight.stored_tensor()
            dense = first.matrix()
            ready = self.precomputed.pop(first.name, None) if len(group) == 1 else None
            if ready is not None and ready.matches(dense):
                result: MaskResult = ready.unpack()
            else:  # none held, or computed before a later fold rewrote this weight
                result = apply_method(self.method, dense, stats, n=self.n, m=self.m)
            del stats, ready, dense
            sparse = write_matrix(first, np.asarray(result.weight, dtype=np.float32))
            for layer in group:
                props = layer.node.metadata_props
                props[SPARSITY_KEY] = f"{self.n}:{self.m}"
                props["mpcompile.method"] = result.method
                props["mpcompile.calibrated"] = "true" if result.calibrated else "false"
            mask = LayerMask(first.name, result.method, result.calibrated, result.kept_magnitude_fraction,
                             partial(first.matrix_of, before), sparse)
            del result, before
            self.results.append(mask)
            if self.after_each is not None:  # e.g. measure, then release the dense weight
                self.after_each(mask)
            if self.progress is not None:
                self.progress(first.name)
        logger.info("masked %d weights %d:%d with %s", len(self.results), self.n, self.m, self.method)
        return ir.passes.PassResult(model, modified=bool(self.results))

    def _merged_stats(self, group: list[GemmLayer]) -> LayerStats | None:
        merged: LayerStats | None = None
        for layer in group:
            stats = self.stats.get(layer.name)
            if stats is None:
                continue
            merged = stats if merged is None else merged.merged(stats)
        return merged
