"""Big synthetic ONNX models (ViT-B/16, ResNet-50 shaped) written with ``onnx.helper``.

Why synthetic: the speed and memory figures of DESIGN §5 are about model *size and shape*
(86 M parameters, 74 GEMM/Conv layers), not about trained weights, and no benchmark may
download anything. Building the graph directly with ``onnx.helper`` (no torch) takes
seconds and keeps peak memory near one copy of the weights: each initializer is drawn,
converted to a TensorProto and dropped before the next one is drawn.

The ViT weights are iid N(0, 0.02²) plus a planted low-rank part whose singular values sit
well above the Marchenko–Pastur edge, so an analysis has a known number of spikes to find
(``planted_rank`` per GEMM/Conv weight). ResNet-50 weights are plain He-initialised.

Models are written under the git-ignored ``benchmarks/_work/`` by the benchmarks; nothing
here is ever committed as a model file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

__all__ = [
    "WORK_DIR",
    "OPSET",
    "ViTConfig",
    "ResNetConfig",
    "GeneratedModel",
    "VIT_B16",
    "VIT_S16_DEPTH4",
    "RESNET50",
    "write_vit",
    "write_vit_b16",
    "write_resnet",
    "write_resnet50",
]

logger = logging.getLogger(__name__)

WORK_DIR = Path(__file__).resolve().parent / "_work"
OPSET = 17
_WEIGHT_STD = 0.02


@dataclass(frozen=True)
class ViTConfig:
    """Shape of a pre-LN ViT: patch-embed conv, CLS + positions, ``depth`` blocks, head."""

    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp: int = 3072
    image: int = 224
    patch: int = 16
    channels: int = 3
    classes: int = 1000

    @property
    def tokens(self) -> int:
        return (self.image // self.patch) ** 2 + 1

    @property
    def gemm_layers(self) -> int:
        """Patch-embed conv + q, k, v, proj, fc1, fc2 per block + head."""
        return 1 + 6 * self.depth + 1


@dataclass(frozen=True)
class ResNetConfig:
    """Shape of a bottleneck ResNet (torchvision v1.5: stride on the 3×3 conv)."""

    blocks: tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64
    expansion: int = 4
    image: int = 224
    channels: int = 3
    classes: int = 1000

    @property
    def gemm_layers(self) -> int:
        """Stem + 3 convs per block + one projection per stage + the FC."""
        return 1 + 3 * sum(self.blocks) + len(self.blocks) + 1


VIT_B16 = ViTConfig()
VIT_S16_DEPTH4 = ViTConfig(dim=384, depth=4, heads=6, mlp=1536)
RESNET50 = ResNetConfig()


@dataclass
class GeneratedModel:
    """What a generator wrote.

    Attributes:
        path: the ``.onnx`` file.
        parameters: number of weight elements (initializers other than shape/axes tensors
            and scalar constants).
        gemm_layers: GEMM/Conv nodes with a constant weight (what the analysis should list).
        planted_rank: low-rank spikes planted per GEMM/Conv weight (0: none).
        weight_names: initializer names of the GEMM/Conv weights, in graph order.
        file_bytes: size of the written file.
    """

    path: Path
    parameters: int
    gemm_layers: int
    planted_rank: int
    weight_names: list[str] = field(default_factory=list)
    file_bytes: int = 0


class _GraphBuilder:
    """Writes nodes and initializers straight into one ModelProto.

    Why not ``helper.make_graph(initializer=[...])``: that call, ``make_model`` and the final
    serialisation each copy every tensor, which puts peak memory at ~5× the weights. Here
    each weight is drawn, copied once into the graph's ``raw_data`` and dropped.
    """

    def __init__(self, rng: np.random.Generator, name: str) -> None:
        self.rng = rng
        self.model = helper.make_model(
            helper.make_graph([], name, [], []),
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="mpcompile-benchmarks",
        )
        self.model.ir_version = 8
        self.graph = self.model.graph
        self.parameters = 0
        self.gemm_weights: list[str] = []

    def const(self, name: str, array: np.ndarray, *, parameter: bool = True) -> str:
        self._tensor(name, array)
        if parameter:
            self.parameters += int(array.size)
        return name

    def ints(self, name: str, values: list[int]) -> str:
        # Shape/axes tensors are metadata, not parameters.
        self._tensor(name, np.asarray(values, dtype=np.int64))
        return name

    def _tensor(self, name: str, array: np.ndarray) -> None:
        tensor = self.graph.initializer.add()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        little = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
        tensor.raw_data = little.tobytes()

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        out = f"{name}_out"
        self.graph.node.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def io(self, name: str, shape: list, output: bool = False) -> None:
        info = helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
        (self.graph.output if output else self.graph.input).append(info)

    def gaussian(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        w = self.rng.standard_normal(shape, dtype=np.float32)
        w *= np.float32(std)
        return w


def _plant_low_rank(matrix: np.ndarray, rank: int, std: float, rng: np.random.Generator) -> None:
    """Add ``U diag(s) Vᵀ`` in place, with s from 4·σ+ down to 2·σ+ of the iid part.

    σ+ = std·(√rows + √cols) is the MP edge of the noise; singular values of 2–4× that are far
    above the BBP threshold std·(rows·cols)^{1/4}, so every planted direction shows up as
    exactly one spike.
    """
    rows, cols = matrix.shape
    rank = min(rank, rows, cols)
    if rank <= 0:
        return
    edge = std * (np.sqrt(rows) + np.sqrt(cols))
    s = edge * np.linspace(4.0, 2.0, rank)
    u = _orthonormal_columns(rng.standard_normal((rows, rank)))
    v = _orthonormal_columns(rng.standard_normal((cols, rank)))
    matrix += ((u * s).astype(np.float32)) @ v.T.astype(np.float32)


def _orthonormal_columns(a: np.ndarray) -> np.ndarray:
    """Cholesky-QR: a tall Gaussian block is well conditioned, and LAPACK's QR on a
    3072×16 block costs ~15 ms against ~0.1 ms for a 16×16 Cholesky."""
    chol = np.linalg.cholesky(a.T @ a)
    return np.linalg.solve(chol, a.T).T


def _save(model: onnx.ModelProto, path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    return path.stat().st_size


# ---------------------------------------------------------------------------- ViT


def write_vit(
    path: str | os.PathLike,
    config: ViTConfig = VIT_B16,
    *,
    seed: int = 0,
    planted_rank: int = 16,
) -> GeneratedModel:
    """Write a pre-LN ViT with separate q/k/v Linears (MatMul + Add on ``[K, N]`` weights).

    Input ``pixels [batch, C, H, W]`` (symbolic batch), output ``logits [batch, classes]``.
    GELU is the sigmoid approximation ``x·σ(1.702x)``; LayerNormalization is the opset-17 op.
    """
    c = config
    if c.dim % c.heads:
        raise ValueError(f"dim {c.dim} is not divisible by heads {c.heads}")
    if c.image % c.patch:
        raise ValueError(f"image {c.image} is not divisible by patch {c.patch}")
    g = _GraphBuilder(np.random.default_rng(seed), f"vit_d{c.dim}_l{c.depth}")
    g.io("pixels", ["batch", c.channels, c.image, c.image])
    head_dim = c.dim // c.heads

    def weight(name: str, shape: tuple[int, ...], matrix_shape: tuple[int, int]) -> str:
        w = g.gaussian(shape, _WEIGHT_STD)
        _plant_low_rank(w.reshape(matrix_shape), planted_rank, _WEIGHT_STD, g.rng)
        g.gemm_weights.append(name)
        return g.const(name, w)

    def linear(x: str, k: int, n: int, name: str) -> str:
        w = weight(f"{name}.weight", (k, n), (k, n))
        b = g.const(f"{name}.bias", g.gaussian((n,), _WEIGHT_STD))
        return g.node("Add", [g.node("MatMul", [x, w], f"{name}/MatMul"), b], f"{name}/Add")

    def layer_norm(x: str, name: str) -> str:
        scale = g.const(f"{name}.weight", np.ones(c.dim, np.float32))
        bias = g.const(f"{name}.bias", np.zeros(c.dim, np.float32))
        return g.node("LayerNormalization", [x, scale, bias], name, axis=-1, epsilon=1e-6)

    # Patch embedding: Conv → [B, D, h, w] → [B, D, h·w] → [B, h·w, D].
    conv_w = weight("patch_embed.weight", (c.dim, c.channels, c.patch, c.patch),
                    (c.dim, c.channels * c.patch * c.patch))
    conv_b = g.const("patch_embed.bias", g.gaussian((c.dim,), _WEIGHT_STD))
    x = g.node("Conv", ["pixels", conv_w, conv_b], "patch_embed/Conv",
               kernel_shape=[c.patch, c.patch], strides=[c.patch, c.patch])
    x = g.node("Reshape", [x, g.ints("shape_flatten", [0, c.dim, -1])], "patch_embed/Reshape")
    x = g.node("Transpose", [x], "patch_embed/Transpose", perm=[0, 2, 1])

    # CLS token expanded to the batch, then concatenated in front of the patch tokens.
    cls = g.const("cls_token", g.gaussian((1, 1, c.dim), _WEIGHT_STD))
    batch = g.node("Shape", [x], "cls/Shape", start=0, end=1)
    cls_shape = g.node("Concat", [batch, g.ints("cls_tail", [1, c.dim])], "cls/Concat_shape", axis=0)
    cls_b = g.node("Expand", [cls, cls_shape], "cls/Expand")
    x = g.node("Concat", [cls_b, x], "cls/Concat", axis=1)
    x = g.node("Add", [x, g.const("pos_embed", g.gaussian((1, c.tokens, c.dim), _WEIGHT_STD))],
               "pos_embed/Add")

    heads_shape = g.ints("shape_heads", [0, 0, c.heads, head_dim])
    merge_shape = g.ints("shape_merge", [0, 0, c.dim])
    inv_sqrt = g.const("attn_scale", np.array(1.0 / np.sqrt(head_dim), np.float32), parameter=False)
    gelu_k = g.const("gelu_k", np.array(1.702, np.float32), parameter=False)
    for i in range(c.depth):
        p = f"blocks.{i}"
        h = layer_norm(x, f"{p}.norm1")
        q = linear(h, c.dim, c.dim, f"{p}.attn.q")
        k = linear(h, c.dim, c.dim, f"{p}.attn.k")
        v = linear(h, c.dim, c.dim, f"{p}.attn.v")
        q = g.node("Transpose", [g.node("Reshape", [q, heads_shape], f"{p}.attn/q_Reshape")],
                   f"{p}.attn/q_Transpose", perm=[0, 2, 1, 3])
        k = g.node("Transpose", [g.node("Reshape", [k, heads_shape], f"{p}.attn/k_Reshape")],
                   f"{p}.attn/k_Transpose", perm=[0, 2, 3, 1])
        v = g.node("Transpose", [g.node("Reshape", [v, heads_shape], f"{p}.attn/v_Reshape")],
                   f"{p}.attn/v_Transpose", perm=[0, 2, 1, 3])
        scores = g.node("Mul", [g.node("MatMul", [q, k], f"{p}.attn/qk_MatMul"), inv_sqrt],
                        f"{p}.attn/scale_Mul")
        probs = g.node("Softmax", [scores], f"{p}.attn/Softmax", axis=-1)
        ctx = g.node("MatMul", [probs, v], f"{p}.attn/av_MatMul")
        ctx = g.node("Transpose", [ctx], f"{p}.attn/ctx_Transpose", perm=[0, 2, 1, 3])
        ctx = g.node("Reshape", [ctx, merge_shape], f"{p}.attn/ctx_Reshape")
        x = g.node("Add", [x, linear(ctx, c.dim, c.dim, f"{p}.attn.proj")], f"{p}/residual1")
        h = linear(layer_norm(x, f"{p}.norm2"), c.dim, c.mlp, f"{p}.mlp.fc1")
        gate = g.node("Mul", [h, gelu_k], f"{p}.mlp/gelu_scale")
        gate = g.node("Sigmoid", [gate], f"{p}.mlp/gelu_sigmoid")
        h = g.node("Mul", [h, gate], f"{p}.mlp/gelu")
        x = g.node("Add", [x, linear(h, c.mlp, c.dim, f"{p}.mlp.fc2")], f"{p}/residual2")

    x = layer_norm(x, "norm")
    cls_out = g.node("Gather", [x, g.ints("cls_index", [0])], "head/Gather_cls", axis=1)
    cls_out = g.node("Reshape", [cls_out, g.ints("shape_cls", [-1, c.dim])], "head/Reshape")
    logits = linear(cls_out, c.dim, c.classes, "head")
    g.graph.node.append(helper.make_node("Identity", [logits], ["logits"], name="output"))
    g.io("logits", ["batch", c.classes], output=True)
    size = _save(g.model, Path(path))
    logger.info("wrote %s (%d parameters, %.0f MB)", path, g.parameters, size / 1e6)
    return GeneratedModel(Path(path), g.parameters, c.gemm_layers, planted_rank, g.gemm_weights, size)


def write_vit_b16(path: str | os.PathLike, seed: int = 0, planted_rank: int = 16) -> GeneratedModel:
    """ViT-B/16: 74 GEMM/Conv layers, ~86.6 M parameters (~346 MB fp32)."""
    return write_vit(path, VIT_B16, seed=seed, planted_rank=planted_rank)


# ------------------------------------------------------------------------- ResNet


def write_resnet(
    path: str | os.PathLike, config: ResNetConfig = RESNET50, *, seed: int = 0
) -> GeneratedModel:
    """Write a bottleneck ResNet with BatchNorm folded into conv biases (He-initialised).

    Input ``pixels [batch, C, H, W]``, output ``logits [batch, classes]``. Each residual
    branch's last conv is He-initialised too, so activations grow ~√2 per block; for 16
    blocks that stays far from fp32 overflow.
    """
    c = config
    g = _GraphBuilder(np.random.default_rng(seed), f"resnet_w{c.width}_{'-'.join(map(str, c.blocks))}")
    g.io("pixels", ["batch", c.channels, c.image, c.image])

    def conv(x: str, cin: int, cout: int, k: int, stride: int, name: str, relu: bool) -> str:
        w = g.gaussian((cout, cin, k, k), np.sqrt(2.0 / (cin * k * k)))
        g.gemm_weights.append(f"{name}.weight")
        g.const(f"{name}.weight", w)
        b = g.const(f"{name}.bias", np.zeros(cout, np.float32))
        pad = k // 2
        y = g.node("Conv", [x, f"{name}.weight", b], f"{name}/Conv", kernel_shape=[k, k],
                   strides=[stride, stride], pads=[pad] * 4)
        return g.node("Relu", [y], f"{name}/Relu") if relu else y

    x = conv("pixels", c.channels, c.width, 7, 2, "conv1", relu=True)
    x = g.node("MaxPool", [x], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = c.width
    for stage, count in enumerate(c.blocks):
        width = c.width * 2**stage
        cout = width * c.expansion
        for block in range(count):
            p = f"layer{stage + 1}.{block}"
            stride = 2 if block == 0 and stage > 0 else 1
            h = conv(x, cin, width, 1, 1, f"{p}.conv1", relu=True)
            h = conv(h, width, width, 3, stride, f"{p}.conv2", relu=True)
            h = conv(h, width, cout, 1, 1, f"{p}.conv3", relu=False)
            shortcut = conv(x, cin, cout, 1, stride, f"{p}.downsample", relu=False) if block == 0 else x
            x = g.node("Relu", [g.node("Add", [h, shortcut], f"{p}/Add")], f"{p}/Relu")
            cin = cout
    x = g.node("GlobalAveragePool", [x], "avgpool")
    x = g.node("Flatten", [x], "flatten", axis=1)
    fc_w = g.gaussian((c.classes, cin), np.sqrt(1.0 / cin))
    g.gemm_weights.append("fc.weight")
    g.const("fc.weight", fc_w)
    g.const("fc.bias", np.zeros(c.classes, np.float32))
    g.graph.node.append(
        helper.make_node("Gemm", [x, "fc.weight", "fc.bias"], ["logits"], name="fc/Gemm", transB=1)
    )
    g.io("logits", ["batch", c.classes], output=True)
    size = _save(g.model, Path(path))
    logger.info("wrote %s (%d parameters, %.0f MB)", path, g.parameters, size / 1e6)
    return GeneratedModel(Path(path), g.parameters, c.gemm_layers, 0, g.gemm_weights, size)


def write_resnet50(path: str | os.PathLike, seed: int = 0) -> GeneratedModel:
    """ResNet-50: 53 convs + 1 Gemm, ~25.5 M parameters (~102 MB fp32)."""
    return write_resnet(path, RESNET50, seed=seed)
