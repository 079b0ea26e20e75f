"""Independent TensorRT 2:4 checker: re-read a written ONNX file and verify the layout rule.

Why independent: a 2:4 mask written along the wrong axis is the most common silent failure of
sparsity tools (DESIGN §3) — the file looks 50 % sparse, TensorRT quietly runs it dense. If the
checker shared the code that decides the reduction axis with the code that writes the masks, the
same bug would pass both. So this module uses only the ``onnx`` package (protobuf and
``onnx.numpy_helper``), never ``onnx_ir``, ``mpcompile.numerics`` or ``mpcompile.passes``, and
derives every reduction axis again from the ONNX operator semantics:

- ``MatMul(X, W)``, ``W`` constant ``[..., K, N]``: groups of 4 run down axis -2 for every output
  column (and every batch). A constant left operand ``A[..., M, K]`` reduces along axis -1.
- ``Gemm(A, B)``: B reduces along axis 0 (``transB=0``) or 1 (``transB=1``); a constant A along
  axis 1 (``transA=0``) or 0 (``transA=1``).
- ``Conv W[Cout, Cin/g, *k]``: for every (cout, kernel position), groups of 4 consecutive input
  channels; ``Cin % 4 == 0``; grouped / depthwise convs have no sparse kernels in TensorRT.

A weight may reach its consumer through Transpose / Cast / DequantizeLinear / Identity; the chain
is evaluated so the test runs on exactly the tensor the consumer sees, and the reduction axis is
mapped back through the Transpose permutations to name the stored axis in the report.

A legal group holds at most 2 nonzeros out of 4 (``-0.0`` counts as zero, NaN as nonzero). Only
nodes the rewrite marked (``metadata_props['mpcompile.sparsity'] == '2:4'``) can fail the check;
every other GEMM is reported too, as sparse-legal or dense, so a user sees what TensorRT will see.
A marked node whose constant weight cannot be found is reported as a failure, not skipped.
Subgraphs (If branches, Loop/Scan bodies) are walked recursively with ONNX's scoping (a body
reads an outer initializer or Constant by name); their layers are named by path,
``<node>/<attribute>/<node>`` (``If_0/then_branch/MatMul_3``). Functions are not walked.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from mpcompile.checks.checker_graph import (
    SPARSE_24,
    SPARSITY_KEY,
    _ONNX_DOMAINS,
    _bodies,
    _dims,
    _Graph,
    _is_marked,
    _node_names,
    _perm,
    _Rule,
    _RULES,
    _stored_axis,
    _Weight,
)
from mpcompile.errors import ExternalDataError, InvalidModelError

if TYPE_CHECKING:  # rich is only needed to render
    from rich.console import Console

__all__ = [
    "SPARSITY_KEY",
    "SPARSE_24",
    "LayerCheck",
    "CheckReport",
    "check_model",
    "check_proto",
    "count_24_violations",
    "render_check_table",
]

logger = logging.getLogger(__name__)

_GROUP = 4
_MAX_NONZERO = 2


@dataclass
class LayerCheck:
    """The 2:4 verdict for one GEMM/Conv weight, as TensorRT would group it.

    Attributes:
        node: node name (``<op>_<index>`` when the node is unnamed).
        op: MatMul / Gemm / Conv.
        weight: name of the stored tensor (initializer or Constant output).
        weight_shape: shape of the weight as the consumer receives it (after the chain).
        shape: the ``[out, K]`` matrix view; for Conv ``K = Cin/g · prod(kernel)``.
        reduction: where the groups of 4 run, in words.
        chain: ops between the stored tensor and the consumer, stored side first.
        dtype: ONNX element type of the stored tensor.
        eligible: whether TensorRT could run this layer with sparse weights at all.
        reason: why not, when ``eligible`` is False.
        marked: the rewrite marked the node 2:4 (only these can fail).
        groups: number of groups of 4 along the reduction (0 when the layout has none).
        violating_groups: groups with more than 2 nonzeros.
        density: fraction of nonzero weight entries.
        legal: eligible and no violating group.
    """

    node: str
    op: str
    weight: str
    weight_shape: tuple[int, ...]
    shape: tuple[int, int]
    reduction: str
    chain: list[str]
    dtype: str
    eligible: bool
    reason: str
    marked: bool
    groups: int
    violating_groups: int
    density: float
    legal: bool

    @property
    def failed(self) -> bool:
        """A marked layer that TensorRT would not run as 2:4."""
        return self.marked and not self.legal

    @property
    def verdict(self) -> str:
        if not self.eligible:
            return f"not eligible: {self.reason}"
        if self.legal:
            return "2:4 ✓"
        return "VIOLATES 2:4" if self.marked else "dense"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["weight_shape"] = list(self.weight_shape)
        data["shape"] = list(self.shape)
        data["failed"] = self.failed
        data["verdict"] = self.verdict
        return data


@dataclass
class CheckReport:
    """Per-layer verdicts for one model file; ``ok`` is what a pipeline gates on."""

    path: str
    layers: list[LayerCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(layer.failed for layer in self.layers)

    @property
    def marked(self) -> list[LayerCheck]:
        return [layer for layer in self.layers if layer.marked]

    @property
    def failures(self) -> list[LayerCheck]:
        return [layer for layer in self.layers if layer.failed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "summary": {
                "layers": len(self.layers),
                "marked": len(self.marked),
                "legal": sum(layer.legal for layer in self.layers),
                "failed": len(self.failures),
                "not_eligible": sum(not layer.eligible for layer in self.layers),
            },
            "layers": [layer.to_dict() for layer in self.layers],
        }


# ----------------------------------------------------------------------------- counting


def count_24_violations(weight: np.ndarray, axis: int) -> tuple[int, int]:
    """(groups, groups with > 2 nonzeros) for groups of 4 consecutive entries along ``axis``.

    The nonzero mask is taken first (1 byte per entry) so moving the axis copies booleans,
    not float weights. ``axis`` length must be a multiple of 4.
    """
    nonzero = np.asarray(weight) != 0  # -0.0 == 0; NaN != 0
    moved = np.moveaxis(nonzero, axis, -1)
    k = moved.shape[-1]
    if k % _GROUP:
        raise ValueError(f"reduction length {k} is not a multiple of {_GROUP}")
    if moved.size == 0:
        return 0, 0
    per_group = moved.reshape(-1, k // _GROUP, _GROUP).sum(axis=-1, dtype=np.int8)
    return int(per_group.size), int(np.count_nonzero(per_group > _MAX_NONZERO))


# ----------------------------------------------------------------------------- loading


STREAM_LOAD_BYTES = 64 * 2**20


def _load(path: Path) -> onnx.ModelProto:
    """Parse the model skeleton; external tensors are read one at a time later."""
    if not path.exists():
        raise InvalidModelError(f"{path}: no such file")
    if not path.is_file():
        raise InvalidModelError(f"{path}: not a file")
    try:
        if path.stat().st_size > STREAM_LOAD_BYTES:
            from mpcompile.io.proto_stream import load_skeleton

            model = load_skeleton(path)  # weights stay in the file, read one at a time
        else:
            model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidModelError(f"{path}: not a readable ONNX model ({first})") from exc
    if not model.HasField("graph") or model.ir_version == 0:
        raise InvalidModelError(f"{path}: not an ONNX model (no graph or IR version)")
    from mpcompile.checks.model_checks import check_text_fields, validate_tensors

    check_text_fields(model, str(path))
    validate_tensors(model, path.parent, inline_data=path.stat().st_size <= STREAM_LOAD_BYTES)
    _validate_external_data(model, path.parent)
    return model


def _validate_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Fail early, with the tensor's name, on external data that is missing or escapes the folder."""
    base = base_dir.resolve()
    sizes: dict[Path, int] = {}
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        if not location:
            raise ExternalDataError(f"tensor '{tensor.name}' uses external data without a location")
        if os.path.isabs(location):
            raise ExternalDataError(
                f"tensor '{tensor.name}': external data location '{location}' is an absolute path"
            )
        target = (base / location).resolve()
        if not target.is_relative_to(base):
            raise ExternalDataError(
                f"tensor '{tensor.name}': external data location '{location}' escapes the model's folder"
            )
        if target not in sizes:
            if not target.is_file():
                raise ExternalDataError(
                    f"tensor '{tensor.name}': external data file '{location}' not found next to the model"
                )
            sizes[target] = target.stat().st_size
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else None
        except ValueError as exc:
            raise ExternalDataError(f"tensor '{tensor.name}': bad external data offset/length") from exc
        end = offset + (length or 0)
        if offset > sizes[target] or end > sizes[target]:
            raise ExternalDataError(
                f"tensor '{tensor.name}': external data '{location}' is truncated "
                f"(needs bytes {offset}..{end}, file has {sizes[target]})"
            )


# ----------------------------------------------------------------------------- entry points


def check_proto(model: onnx.ModelProto, base_dir: str | Path = ".", path: str = "<memory>") -> CheckReport:
    """Check an already parsed model; external tensors are read from ``base_dir`` one by one."""
    report = CheckReport(path=path)

    def shape_of(weight: _Weight) -> tuple[int, ...]:
        shape = tuple(int(d) for d in weight.tensor.dims)
        for node in weight.chain:
            if node.op_type == "Transpose":
                shape = tuple(shape[i] for i in _perm(node, len(shape)))
        return shape

    def walk(g: _Graph, prefix: str) -> None:
        for node, name in zip(g.graph.node, _node_names(g.graph)):
            rule_fn = _RULES.get(node.op_type) if node.domain in _ONNX_DOMAINS else None
            rule = rule_fn(g, node, shape_of) if rule_fn is not None else None
            if rule is not None:
                report.layers.append(_check_layer(g, node, prefix + name, rule, shape_of(rule.weight)))
            elif _is_marked(node):
                report.layers.append(_unresolved_layer(node, prefix + name, rule_fn is not None))
            for attr_name, body in _bodies(node):  # If branches, Loop/Scan bodies
                walk(g.child(body), f"{prefix}{name}/{attr_name}/")

    walk(_Graph(model, Path(base_dir)), "")
    logger.info(
        "checked %d GEMM/Conv layers in %s: %d marked 2:4, %d failed",
        len(report.layers), path, len(report.marked), len(report.failures),
    )
    return report


def _check_layer(g: _Graph, node: onnx.NodeProto, name: str, rule: _Rule, shape: tuple[int, ...]) -> LayerCheck:
    arr = g.evaluate(rule.weight)
    if tuple(arr.shape) != shape:
        raise InvalidModelError(
            f"node '{name}': weight '{rule.weight.name}' has shape {arr.shape}, dims say {shape}"
        )
    ndim = len(shape)
    stored = _stored_axis(rule.weight.chain, rule.axis, ndim)
    reduction = rule.reduction
    if rule.weight.chain and stored != rule.axis:
        stored_shape = tuple(int(d) for d in rule.weight.tensor.dims)
        reduction += f"; stored {rule.weight.name}[{_dims(stored_shape)}] axis {stored}"
    eligible, reason = rule.eligible, rule.reason
    red_len = shape[rule.axis]
    groups = violating = 0
    if red_len % _GROUP:
        what = "Cin" if node.op_type == "Conv" else "K"
        reason = reason or f"{what}={red_len} is not a multiple of {_GROUP}"
        eligible = False
    else:
        groups, violating = count_24_violations(arr, rule.axis)
    density = float(np.count_nonzero(arr) / arr.size) if arr.size else 0.0
    return LayerCheck(
        node=name,
        op=node.op_type,
        weight=rule.weight.name,
        weight_shape=shape,
        shape=(int(rule.out), int(rule.k)),
        reduction=reduction,
        chain=[n.op_type for n in rule.weight.chain],
        dtype=onnx.TensorProto.DataType.Name(rule.weight.tensor.data_type),
        eligible=eligible,
        reason=reason,
        marked=_is_marked(node),
        groups=groups,
        violating_groups=violating,
        density=density,
        legal=eligible and groups > 0 and violating == 0,
    )


def _unresolved_layer(node: onnx.NodeProto, name: str, known_op: bool) -> LayerCheck:
    """A node marked 2:4 whose weight the checker cannot find: the mark itself is a bug."""
    reason = (
        "marked 2:4 but its weight is not a constant (initializer / Constant through "
        "Transpose, Cast, DequantizeLinear, Identity)"
        if known_op
        else f"marked 2:4 but {node.op_type} has no TensorRT sparse-weight path"
    )
    return LayerCheck(
        node=name, op=node.op_type, weight="", weight_shape=(), shape=(0, 0), reduction="–",
        chain=[], dtype="", eligible=False, reason=reason, marked=True, groups=0,
        violating_groups=0, density=0.0, legal=False,
    )


def check_model(path: str | Path) -> CheckReport:
    """Re-read ``path`` from disk and check every GEMM/Conv weight against TensorRT's 2:4 rule.

    Raises:
        InvalidModelError: missing file, not ONNX, or a malformed quantization chain.
        ExternalDataError: external tensor data missing, truncated or outside the model's folder.
    """
    p = Path(path)
    model = _load(p)
    return check_proto(model, base_dir=p.resolve().parent, path=str(p))


# ----------------------------------------------------------------------------- rendering


def render_check_table(report: CheckReport, console: Console) -> None:
    """Print one row per layer; failing marked layers in red so they stand out in CI logs."""
    from rich.table import Table

    table = Table(title=f"2:4 check — {report.path}", show_lines=False)
    for column, justify in (
        ("layer", "left"), ("op", "left"), ("shape", "right"), ("reduction", "left"),
        ("density", "right"), ("violating groups", "right"), ("verdict", "left"),
    ):
        table.add_column(column, justify=justify, overflow="fold")
    for layer in report.layers:
        if layer.failed:
            style = "bold red"
        elif not layer.eligible:
            style = "yellow" if layer.marked else "dim"
        elif layer.legal:
            style = "green"
        else:
            style = ""
        violating = f"{layer.violating_groups}/{layer.groups}" if layer.groups else "–"
        table.add_row(
            layer.node + (" *" if layer.marked else ""),
            layer.op,
            f"{layer.shape[0]}×{layer.shape[1]}",
            layer.reduction,
            f"{layer.density:.1%}",
            violating,
            layer.verdict,
            style=style,
        )
    console.print(table)
    marked, failed = len(report.marked), len(report.failures)
    status = "[green]OK[/green]" if report.ok else f"[bold red]FAILED[/bold red] ({failed} of {marked} marked layers)"
    console.print(f"{len(report.layers)} layers, {marked} marked 2:4 (*): {status}")
