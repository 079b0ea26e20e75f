"""Frozen-mask distillation after 2:4 one-shot pruning (P1 CAST stage 2), and export back to ONNX.

Why distil with the mask frozen: one-shot 2:4 loses accuracy that a short fine-tune recovers,
but only if the zero pattern that TensorRT will accelerate survives training. The recipe
(reference §2.4 stage 2): teacher = the dense model, loss
``(1−α)·CE + α·τ²·KL(softmax(z_T/τ) ‖ softmax(z_S/τ))`` with α = 0.5, τ = 2, AdamW, and the
masked weights re-zeroed after **every** optimiser step (their gradients are zeroed too, so
Adam's moments never push them). The exported ONNX marks every node whose weight is a
masked parameter and is 2:4 along TensorRT's reduction axis with ``mpcompile.sparsity=2:4``,
so ``mpcompile check`` verifies it.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mpcompile.errors import OptionalDependencyError, UsageError

try:
    import torch
    from torch import nn
except ModuleNotFoundError as exc:  # pragma: no cover - exercised only without the extra
    raise OptionalDependencyError("torch", "torch", "fine-tuning") from exc

__all__ = [
    "BundledFinetuneReport",
    "FinetuneOptions",
    "FinetuneResult",
    "accuracy",
    "apply_masks",
    "distil",
    "distillation_loss",
    "export_masked_onnx",
    "finetune",
    "finetune_bundled",
    "masks_from_compile",
]

logger = logging.getLogger(__name__)

SPARSITY_KEY = "mpcompile.sparsity"
# progress(step, total_steps, loss)
Progress = Callable[[int, int, float], None]


@dataclass
class FinetuneOptions:
    epochs: int = 5
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 64
    alpha: float = 0.5
    tau: float = 2.0
    seed: int = 0


@dataclass
class FinetuneResult:
    """What training did: losses per epoch and a proof that the masks held."""

    epoch_losses: list[float]
    steps: int
    masked_parameters: list[str]
    masked_nonzeros: int  # entries under a mask that are non-zero after training (must be 0)
    options: FinetuneOptions = field(default_factory=FinetuneOptions)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _matrix(w: np.ndarray) -> np.ndarray:
    """A torch weight as the ``[out, K]`` matrix mpcompile writes masks in (Conv K ordered kh, kw, Cin)."""
    return w if w.ndim == 2 else w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1)


def _keep_to_param(keep: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) == 2:
        return keep
    return keep.reshape(shape[0], shape[2], shape[3], shape[1]).transpose(0, 3, 1, 2)


def masks_from_compile(module: nn.Module, result: Any, *, load_weights: bool = False) -> dict[str, torch.Tensor]:
    """``{param name: bool keep-mask}`` for every module weight a compile result made 2:4.

    Layers are matched by value like :func:`mpcompile.api.apply_masks_to_torch`, and also up
    to a positive per-output-row scale: the exporter folds an eval-mode BatchNorm into the
    preceding conv (row i scaled by γ_i/√(var_i+ε)), which leaves the zero pattern unchanged
    but defeats exact matching.

    ``load_weights``: also copy the compiled sparse weights into the module (row scale
    undone). Data-aware methods (``cast-obs``, ``sparsegpt``, ``admm``) update the weights
    they keep, so the mask alone is not the one-shot model a fine-tune should start from.
    """
    candidates = [(m.dense.astype(np.float64), m.sparse) for m in result.masks]
    masks: dict[str, torch.Tensor] = {}
    used: set[int] = set()
    for name, param in module.named_parameters():
        if not name.endswith("weight") or param.ndim not in (2, 4):
            continue
        w = param.detach().double().cpu().numpy()
        matrix = _matrix(w)
        for index, (dense, sparse) in enumerate(candidates):
            if index in used or dense.shape != matrix.shape:
                continue
            denom = np.einsum("ij,ij->i", matrix, matrix)
            scale = np.einsum("ij,ij->i", dense, matrix) / np.where(denom > 0, denom, 1.0)
            if np.all(scale > 0) and np.allclose(dense, scale[:, None] * matrix, rtol=1e-4, atol=1e-6):
                masks[name] = torch.from_numpy(np.ascontiguousarray(_keep_to_param(sparse != 0, w.shape)))
                if load_weights:
                    unscaled = _keep_to_param(sparse.astype(np.float64) / scale[:, None], w.shape)
                    with torch.no_grad():
                        param.copy_(torch.from_numpy(np.ascontiguousarray(unscaled)).to(param.dtype))
                used.add(index)
                break
    if len(used) < len(candidates):
        logger.warning("%d of %d sparse layers matched no module weight", len(candidates) - len(used), len(candidates))
    return masks


@torch.no_grad()
def apply_masks(module: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero every masked-out weight in place."""
    params = dict(module.named_parameters())
    for name, keep in masks.items():
        params[name].mul_(keep.to(params[name].dtype))


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float = 0.5, tau: float = 2.0
) -> torch.Tensor:
    """``(1−α)·CE(z_S, y) + α·τ²·KL(softmax(z_T/τ) ‖ softmax(z_S/τ))`` (Hinton; τ² keeps gradient scale)."""
    ce = nn.functional.cross_entropy(student, labels)
    kl = nn.functional.kl_div(
        nn.functional.log_softmax(student / tau, dim=1),
        nn.functional.log_softmax(teacher / tau, dim=1),
        log_target=True,
        reduction="batchmean",
    )
    return (1.0 - alpha) * ce + alpha * tau * tau * kl


# forward(module, batch) -> output; loss(student_out, teacher_out, batch) -> scalar
Forward = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
Loss = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
# on_epoch(epochs_done, student): called after each epoch with the student in eval mode
EpochHook = Callable[[int, nn.Module], None]


def distil(
    student: nn.Module,
    teacher: nn.Module,
    inputs: dict[str, Any],
    masks: dict[str, torch.Tensor],
    loss: Loss,
    forward: Forward,
    options: FinetuneOptions | None = None,
    progress: Progress | None = None,
    on_epoch: EpochHook | None = None,
) -> FinetuneResult:
    """Train ``student`` in place towards ``teacher``'s outputs with the zero pattern ``masks`` frozen.

    Why one loop for every model: a classifier (KD on logits), a sentence encoder (match the
    dense hidden states) and a causal LM (KD per token) differ only in how a batch goes
    through the model and what is compared, so those are the two callables. ``inputs`` are
    arrays sharing their first axis (samples); the teacher's outputs are computed once. AdamW
    with a cosine schedule over ``epochs``; after every step the masked weights are re-zeroed
    (and their gradients zeroed before it, so Adam's moments never push them), so the
    pattern TensorRT accelerates cannot drift.
    """
    opts = options or FinetuneOptions()
    if not masks:
        raise UsageError("no masked parameters: nothing to fine-tune under a frozen mask")
    params = dict(student.named_parameters())
    missing = set(masks) - set(params)
    if missing:
        raise UsageError(f"masks name parameters the model does not have: {sorted(missing)[:3]}")
    data = {name: torch.as_tensor(np.asarray(value)) for name, value in inputs.items()}
    count = len(next(iter(data.values())))
    if any(len(value) != count for value in data.values()):
        raise UsageError("fine-tuning inputs must share their first (sample) axis")
    gen = torch.Generator().manual_seed(opts.seed)
    teacher.eval()
    with torch.no_grad():
        teacher_out = torch.cat([forward(teacher, {k: v[i : i + 512] for k, v in data.items()})
                                 for i in range(0, count, 512)])
    optimizer = torch.optim.AdamW(student.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    per_epoch = (count + opts.batch_size - 1) // opts.batch_size
    total = per_epoch * opts.epochs
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))
    keep = {name: mask.to(params[name].dtype) for name, mask in masks.items()}
    apply_masks(student, masks)
    losses, step = [], 0
    for epoch in range(opts.epochs):
        student.train()
        order = torch.randperm(count, generator=gen)
        running = 0.0
        for start in range(0, count, opts.batch_size):
            idx = order[start : start + opts.batch_size]
            batch = {k: v[idx] for k, v in data.items()}
            value = loss(forward(student, batch), teacher_out[idx], batch)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            for name, k in keep.items():
                if params[name].grad is not None:
                    params[name].grad.mul_(k)
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                for name, k in keep.items():
                    params[name].mul_(k)
            running += float(value.detach()) * len(idx)
            step += 1
            if progress:
                progress(step, total, float(value.detach()))
        losses.append(running / count)
        student.eval()
        if on_epoch:
            on_epoch(epoch + 1, student)
    student.eval()
    nonzero = sum(int((params[n].detach()[~m] != 0).sum()) for n, m in masks.items())
    return FinetuneResult(losses, step, sorted(masks), nonzero, opts)


def finetune(
    student: nn.Module,
    teacher: nn.Module,
    train: tuple[Any, Any],
    masks: dict[str, torch.Tensor],
    options: FinetuneOptions | None = None,
    progress: Progress | None = None,
) -> FinetuneResult:
    """Distil a classifier ``teacher`` into ``student`` (KD on logits + CE on labels), mask frozen."""
    opts = options or FinetuneOptions()
    x, y = (torch.as_tensor(np.asarray(a)) for a in train)
    return distil(student, teacher, {"x": x.float(), "labels": y.long()}, masks,
                  loss=lambda s, t, batch: distillation_loss(s, t, batch["labels"], opts.alpha, opts.tau),
                  forward=lambda module, batch: module(batch["x"]), options=opts, progress=progress)


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[Any, Any]) -> float:
    x, y = (torch.as_tensor(np.asarray(a)) for a in data)
    model.eval()
    return float((model(x.float()).argmax(dim=1) == y.long()).float().mean())


def _is_24(w: np.ndarray, axis: int) -> bool:
    """Every 4 consecutive entries along ``axis`` hold ≤ 2 non-zeros (and the axis splits into 4s)."""
    moved = np.moveaxis(w, axis, -1)
    if moved.shape[-1] % 4:
        return False
    groups = moved.reshape(*moved.shape[:-1], -1, 4)
    return bool(np.all(np.count_nonzero(groups, axis=-1) <= 2))


def _mark_sparse_nodes(proto: Any, masks: dict[str, np.ndarray]) -> list[str]:
    """Mark nodes whose initializer weight carries a masked zero pattern and is TensorRT 2:4.

    A node corresponds to a masked parameter when its weight, brought to torch layout, has the
    shape of that parameter and zeros exactly where the mask drops (BN folding scales rows,
    so values differ but zeros do not).
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    patterns = [(name, ~keep) for name, keep in masks.items()]
    marked = []
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Conv":
            if w.ndim != 4 or (attrs["group"].i if "group" in attrs else 1) != 1:
                continue
            torch_layout, axis = w, 1  # groups of 4 input channels at each (kh, kw)
        elif node.op_type == "Gemm":
            trans_b = attrs["transB"].i if "transB" in attrs else 0
            torch_layout, axis = (w, 1) if trans_b else (w.T, 0)
        else:
            if w.ndim != 2:
                continue
            torch_layout, axis = w.T, 0  # MatMul(X, W[K,N]): groups down axis 0
        for name, dropped in patterns:
            if dropped.shape == torch_layout.shape and np.array_equal(torch_layout == 0, dropped) and _is_24(w, axis):
                entry = node.metadata_props.add()
                entry.key, entry.value = SPARSITY_KEY, "2:4"
                method = node.metadata_props.add()
                method.key, method.value = "mpcompile.method", "finetune"
                marked.append(node.name or node.op_type)
                break
    return marked


def export_masked_onnx(
    module: nn.Module,
    example: torch.Tensor | tuple[torch.Tensor, ...],
    path: str | Path,
    masks: dict[str, torch.Tensor],
    *,
    input_names: tuple[str, ...] = ("input",),
    output_names: tuple[str, ...] = ("logits",),
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    opset: int = 17,
) -> tuple[Path, list[str]]:
    """Legacy-exporter ONNX of ``module`` with the 2:4 nodes marked; returns (path, marked nodes).

    ``example``: one input tensor or a tuple of them (one per ``input_names``); by default only
    the batch axis of the first input and output is dynamic.
    """
    import onnx

    module.eval()
    args = example if isinstance(example, tuple) else (example,)
    axes = dynamic_axes or {input_names[0]: {0: "N"}, output_names[0]: {0: "N"}}
    with tempfile.TemporaryDirectory(prefix="mpcompile-ft-") as tmp:
        raw = Path(tmp) / "model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, args, str(raw), dynamo=False, opset_version=opset,
                input_names=list(input_names), output_names=list(output_names),
                dynamic_axes=axes, do_constant_folding=True,
            )
        proto = onnx.load(str(raw))
    marked = _mark_sparse_nodes(proto, {n: m.cpu().numpy().astype(bool) for n, m in masks.items()})
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = target.with_name(f".{target.name}.tmp")
    onnx.save(proto, str(tmp_path))
    tmp_path.replace(target)  # atomic: a reader never sees a half-written model
    return target, marked


@dataclass
class BundledFinetuneReport:
    model: str
    method: str
    dense_accuracy: float
    oneshot_accuracy: float
    finetuned_accuracy: float
    onnx_accuracy: float
    output: str
    marked_nodes: list[str]
    check_ok: bool
    masked_parameters: list[str]
    masked_nonzeros: int
    epoch_losses: list[float]
    options: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bundled_split(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    from mpcompile.zoo.bundled import load_digits_split

    x, y = load_digits_split(split)
    return (x.reshape(len(x), -1) if name == "digits_mlp" else x), y


def finetune_bundled(
    name: str,
    *,
    method: str = "magnitude",
    output: str | Path | None = None,
    options: FinetuneOptions | None = None,
    progress: Progress | None = None,
    work_dir: str | Path | None = None,
) -> BundledFinetuneReport:
    """Dense → 2:4 one-shot (``method``) → frozen-mask distillation → ONNX, on a bundled digits model.

    Accuracies are on the held-out test split; data-aware methods calibrate on the calib split.
    """
    import onnx

    from mpcompile.checks.checker import check_model
    from mpcompile.zoo.bundled import bundled_info, evaluate_onnx_accuracy, write_split_npz
    from mpcompile.zoo.digits import load_bundled_module

    opts = options or FinetuneOptions()
    torch.manual_seed(opts.seed)
    info = bundled_info(name)
    teacher = load_bundled_module(name)
    student = copy.deepcopy(teacher)
    test = _bundled_split(name, "test")
    example = torch.zeros(1, *info["input_shape"][1:])
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="mpcompile-ft-"))
    work.mkdir(parents=True, exist_ok=True)

    from mpcompile.io.model_forms import to_onnx_path
    from mpcompile.pipeline import CompileOptions, compile_model

    exported = to_onnx_path(copy.deepcopy(teacher), example, work)
    calib = None
    if method != "magnitude":
        input_name = onnx.load(str(exported), load_external_data=False).graph.input[0].name
        calib = str(write_split_npz("calib", work / "calib.npz", input_name=input_name, model=name))
    result = compile_model(exported, CompileOptions(permute=False, method=method, calib=calib,
                                                    output=str(work / f"{name}.oneshot.onnx")))
    masks = masks_from_compile(student, result, load_weights=True)  # data methods update kept weights
    dense_acc, oneshot_acc = accuracy(teacher, test), accuracy(student, test)
    trained = finetune(student, teacher, _bundled_split(name, "train"), masks, opts, progress)
    tuned_acc = accuracy(student, test)
    out = Path(output) if output else Path(f"{name}.finetuned.onnx")
    path, marked = export_masked_onnx(student, example, out, masks,
                                      input_names=(info["input"],), output_names=(info["output"],))
    check = check_model(path)
    return BundledFinetuneReport(
        model=name, method=result.method, dense_accuracy=dense_acc, oneshot_accuracy=oneshot_acc,
        finetuned_accuracy=tuned_acc, onnx_accuracy=evaluate_onnx_accuracy(path, "test"), output=str(path),
        marked_nodes=marked, check_ok=bool(check.ok and check.marked),
        masked_parameters=trained.masked_parameters, masked_nonzeros=trained.masked_nonzeros,
        epoch_losses=trained.epoch_losses, options=asdict(opts),
    )
