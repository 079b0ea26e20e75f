"""A Llama-2-shaped ONNX decoder with FP16 weights in external data, written one tensor at a time.

Why a generator and not a download: no benchmark may download anything, and the cost of a
7B analysis is about *shape and size* (32 blocks of q/k/v/o 4096², gate/up 11008×4096 and
down 4096×11008, FP16, 13.5 GB), not about trained values. Weights are iid N(0, 0.02²) plus
a planted low-rank part (``planted_rank`` singular values 2–4× the MP edge per GEMM weight),
so the analysis has a known number of spikes to find.

Why streamed: the model is bigger than one process may hold on the 24 GB machines, so each
weight is drawn, converted to FP16, appended to the data file (page aligned, so readers can
memory-map it) and dropped; the ``.onnx`` file holds only the graph and the references.

The graph is a real decoder ONNX Runtime runs (FP16 end to end): token embedding Gather,
per block RMSNorm → q/k/v MatMul → multi-head causal-free softmax attention → o MatMul →
residual, RMSNorm → SiLU(gate)·up → down → residual; final RMSNorm and the LM-head MatMul.
RoPE and the KV cache are left out: they hold no weights.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

__all__ = ["LlamaConfig", "LLAMA2_7B", "LLAMA_1B", "LLAMA2_7B_2LAYERS", "TINY", "cache_dir", "write_llama",
           "DiskSpaceError"]

OPSET = 17
_STD = 0.02
_ALIGN = 4096


@dataclass(frozen=True)
class LlamaConfig:
    name: str
    layers: int
    dim: int
    ffn: int
    heads: int
    vocab: int

    @property
    def parameters(self) -> int:
        per_layer = 4 * self.dim * self.dim + 3 * self.dim * self.ffn + 2 * self.dim
        return self.layers * per_layer + 2 * self.vocab * self.dim + self.dim

    @property
    def weight_bytes(self) -> int:
        return 2 * self.parameters

    @property
    def gemm_weights(self) -> int:
        return 7 * self.layers + 1


LLAMA2_7B = LlamaConfig("llama2-7b", layers=32, dim=4096, ffn=11008, heads=32, vocab=32000)
LLAMA2_7B_2LAYERS = LlamaConfig("llama2-7b-2layers", layers=2, dim=4096, ffn=11008, heads=32, vocab=32000)
LLAMA_1B = LlamaConfig("llama-1b", layers=22, dim=2048, ffn=5632, heads=32, vocab=32000)  # TinyLlama-1.1B shape
TINY = LlamaConfig("tiny", layers=2, dim=256, ffn=688, heads=4, vocab=1000)


class DiskSpaceError(RuntimeError):
    """Not enough free disk for the model and what the benchmark writes beside it."""


def cache_dir() -> Path:
    """Outside any git tree: ``$MPCOMPILE_BENCH_CACHE`` or ``~/.cache/mpcompile/scale``."""
    env = os.environ.get("MPCOMPILE_BENCH_CACHE")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mpcompile" / "scale"


def require_disk(folder: Path, needed: int) -> None:
    """Refuse (one line) unless ``folder``'s file system has ``needed`` bytes free."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DiskSpaceError(f"{folder}: {free / 1e9:.1f} GB free, the benchmark needs {needed / 1e9:.1f} GB "
                             "(2× the model: the model and a compiled copy); free space or set "
                             "MPCOMPILE_BENCH_CACHE to a bigger disk")


class _Writer:
    def __init__(self, data_path: Path, location: str, rng: np.random.Generator, planted_rank: int) -> None:
        self.data = open(data_path, "wb")
        self.location = location
        self.offset = 0
        self.rng = rng
        self.planted_rank = planted_rank
        self.initializers: list[TensorProto] = []

    def tensor(self, name: str, array: np.ndarray) -> str:
        pad = -self.offset % _ALIGN
        self.data.write(b"\0" * pad)
        self.offset += pad
        raw = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        self.data.write(raw)
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        for key, value in (("location", self.location), ("offset", str(self.offset)), ("length", str(len(raw)))):
            t.external_data.add(key=key, value=value)
        t.data_location = TensorProto.EXTERNAL
        self.initializers.append(t)
        self.offset += len(raw)
        return name

    def small(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(onnx.numpy_helper.from_array(array, name))
        return name

    def weight(self, name: str, k: int, n: int) -> str:
        """A ``[K, N]`` MatMul weight: iid noise plus the planted low-rank part, FP16."""
        w = self.rng.standard_normal((k, n), dtype=np.float32)
        w *= np.float32(_STD)
        rank = min(self.planted_rank, k, n)
        if rank:
            edge = _STD * (np.sqrt(k) + np.sqrt(n))
            s = (edge * np.linspace(4.0, 2.0, rank)).astype(np.float32)
            u, _ = np.linalg.qr(self.rng.standard_normal((k, rank), dtype=np.float32))
            v, _ = np.linalg.qr(self.rng.standard_normal((n, rank), dtype=np.float32))
            w += (u * s) @ v.T
        out = self.tensor(name, w.astype(np.float16))
        del w
        return out

    def close(self) -> None:
        self.data.close()


def write_llama(folder: str | os.PathLike, config: LlamaConfig, *, seed: int = 0, planted_rank: int = 16,
                seq: int = 8) -> Path:
    """Write ``config`` as ``<folder>/<name>.onnx`` + ``<name>.onnx.data``; return the model path.

    Written under temporary names and renamed at the end, so an interrupted run never leaves
    a model that looks complete. Refuses when the folder's disk has < 2× the weights free.
    """
    out_dir = Path(folder)
    require_disk(out_dir, 2 * config.weight_bytes)
    path = out_dir / f"{config.name}.onnx"
    data_path = out_dir / f"{config.name}.onnx.data"
    tmp_data = out_dir / f".{config.name}.onnx.data.partial"
    rng = np.random.default_rng(seed)
    w = _Writer(tmp_data, data_path.name, rng, planted_rank)
    nodes: list[onnx.NodeProto] = []
    d, h = config.dim, config.heads

    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        out = f"{name}_out"
        nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    eps = w.small("eps", np.array(1e-5, dtype=np.float16))
    heads_shape = w.small("heads_shape", np.array([1, seq, h, d // h], dtype=np.int64))
    flat_shape = w.small("flat_shape", np.array([1, seq, d], dtype=np.int64))
    scale = w.small("attn_scale", np.array(1.0 / np.sqrt(d // h), dtype=np.float16))

    def rms_norm(x: str, name: str) -> str:
        g = w.tensor(f"{name}.weight", np.ones(d, dtype=np.float16))
        sq = node("Mul", [x, x], f"{name}/sq")
        mean = node("ReduceMean", [sq], f"{name}/mean", axes=[-1], keepdims=1)
        rms = node("Sqrt", [node("Add", [mean, eps], f"{name}/eps")], f"{name}/sqrt")
        return node("Mul", [node("Div", [x, rms], f"{name}/div"), g], f"{name}/scale")

    x = node("Gather", [w.tensor("embed_tokens.weight",
                                 (rng.standard_normal((config.vocab, d), dtype=np.float32) * _STD).astype(np.float16)),
                        "input_ids"], "embed", axis=0)
    for i in range(config.layers):
        p = f"layers.{i}"
        a = rms_norm(x, f"{p}.input_layernorm")
        heads = {}
        for proj in ("q", "k", "v"):
            y = node("MatMul", [a, w.weight(f"{p}.self_attn.{proj}_proj.weight", d, d)], f"{p}/self_attn/{proj}_proj")
            heads[proj] = node("Transpose", [node("Reshape", [y, heads_shape], f"{p}/self_attn/{proj}_heads")],
                               f"{p}/self_attn/{proj}_t", perm=[0, 2, 1, 3])
        kt = node("Transpose", [heads["k"]], f"{p}/self_attn/kT", perm=[0, 1, 3, 2])
        scores = node("Mul", [node("MatMul", [heads["q"], kt], f"{p}/self_attn/qk"), scale], f"{p}/self_attn/scaled")
        ctx = node("MatMul", [node("Softmax", [scores], f"{p}/self_attn/softmax", axis=-1), heads["v"]],
                   f"{p}/self_attn/ctx")
        ctx = node("Reshape", [node("Transpose", [ctx], f"{p}/self_attn/ctx_t", perm=[0, 2, 1, 3]), flat_shape],
                   f"{p}/self_attn/ctx_flat")
        o = node("MatMul", [ctx, w.weight(f"{p}.self_attn.o_proj.weight", d, d)], f"{p}/self_attn/o_proj")
        x = node("Add", [x, o], f"{p}/attn_residual")
        m = rms_norm(x, f"{p}.post_attention_layernorm")
        gate = node("MatMul", [m, w.weight(f"{p}.mlp.gate_proj.weight", d, config.ffn)], f"{p}/mlp/gate_proj")
        silu = node("Mul", [gate, node("Sigmoid", [gate], f"{p}/mlp/sigmoid")], f"{p}/mlp/silu")
        up = node("MatMul", [m, w.weight(f"{p}.mlp.up_proj.weight", d, config.ffn)], f"{p}/mlp/up_proj")
        down = node("MatMul", [node("Mul", [silu, up], f"{p}/mlp/act"),
                               w.weight(f"{p}.mlp.down_proj.weight", config.ffn, d)], f"{p}/mlp/down_proj")
        x = node("Add", [x, down], f"{p}/mlp_residual")
    x = rms_norm(x, "norm")
    logits = node("MatMul", [x, w.weight("lm_head.weight", d, config.vocab)], "lm_head")
    nodes[-1].output[0] = "logits"
    w.close()
    graph = helper.make_graph(
        nodes, config.name,
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, seq])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, [1, seq, config.vocab])],
        w.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="mpcompile-benchmarks")
    model.ir_version = 8
    model.metadata_props.add(key="mpcompile.bench.config", value=str(asdict(config)))
    os.replace(tmp_data, data_path)
    tmp = out_dir / f".{config.name}.onnx.partial"
    tmp.write_bytes(model.SerializeToString())
    os.replace(tmp, path)
    return path
