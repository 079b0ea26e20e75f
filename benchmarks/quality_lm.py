"""A small byte-level decoder LM trained here, for the one-shot 2:4 quality benchmark.

Why train one: the Wanda / SparseGPT papers judge 2:4 by the perplexity of a causal LM on
held-out text, and no decoder LM ships offline here. Text that does ship offline is the Python
standard library: its docstrings (English prose with code, ~1 MB) are the corpus. Files are
split, not lines: every 10th module's docstrings are held out, so evaluation text was never
trained on. The model (pre-LN GPT: 4 blocks, d 256, 4 heads, MLP 1024, 64-byte context,
vocab = 7-bit ASCII) trains in a few minutes on 2 CPU cores with a fixed seed and is exported
to ONNX once, cached under the git-ignored ``benchmarks/_work/lm/`` with a key of everything
that determines it (recipe, corpus hash, torch version); the export is checked against torch
before it is trusted.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import sysconfig
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.model_generators import WORK_DIR

LM_DIR = WORK_DIR / "lm"
LM_RECIPE = 1  # bump when the corpus, model or training recipe changes
VOCAB = 128  # 7-bit ASCII; other bytes were dropped from the corpus
EXPORT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class LmConfig:
    layers: int = 4
    dim: int = 256
    heads: int = 4
    mlp: int = 1024
    context: int = 64
    steps: int = 600
    batch: int = 32
    lr: float = 3e-3
    seed: int = 0

    @property
    def tag(self) -> str:
        return f"L{self.layers}d{self.dim}s{self.steps}"


FULL = LmConfig()
QUICK = LmConfig(layers=2, dim=128, heads=4, mlp=512, steps=120)  # CI smoke run: ~15 s of training alone


def docstring_corpus() -> tuple[bytes, bytes, dict[str, Any]]:
    """(train, held-out) ASCII text from the docstrings of the stdlib's top-level modules."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if not p.name.startswith("_"))
    train, held = [], []
    for index, path in enumerate(files):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        docs = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    docs.append(doc.strip())
        text = "\n\n".join(docs).encode("ascii", errors="ignore")
        (held if index % 10 == 5 else train).append(text)
    train_bytes, held_bytes = b"\n\n".join(train), b"\n\n".join(held)
    info = {"source": f"docstrings of {len(files)} top-level stdlib modules under {stdlib}",
            "train_bytes": len(train_bytes), "held_out_bytes": len(held_bytes),
            "held_out_modules": "every 10th module (index % 10 == 5)",
            "sha256": hashlib.sha256(train_bytes + b"\0" + held_bytes).hexdigest()[:16]}
    return train_bytes, held_bytes, info


def windows(text: bytes, length: int, count: int, seed: int) -> np.ndarray:
    """``count`` windows of ``length`` bytes at random (seeded) offsets, int64 [count, length]."""
    data = np.frombuffer(text, dtype=np.uint8)
    starts = np.random.default_rng(seed).integers(0, len(data) - length, size=count)
    return np.stack([data[s : s + length] for s in starts]).astype(np.int64)


def _model(cfg: LmConfig):
    import torch

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1 = torch.nn.LayerNorm(cfg.dim)
            self.qkv = torch.nn.Linear(cfg.dim, 3 * cfg.dim)
            self.proj = torch.nn.Linear(cfg.dim, cfg.dim)
            self.ln2 = torch.nn.LayerNorm(cfg.dim)
            self.fc1 = torch.nn.Linear(cfg.dim, cfg.mlp)
            self.fc2 = torch.nn.Linear(cfg.mlp, cfg.dim)

        def forward(self, x, causal):
            b, t, d = x.shape
            hd = d // cfg.heads
            q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
            q, k, v = (z.reshape(b, t, cfg.heads, hd).transpose(1, 2) for z in (q, k, v))
            att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(hd)) + causal
            y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
            x = x + self.proj(y)
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))

    class TinyLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = torch.nn.Embedding(VOCAB, cfg.dim)
            self.pos = torch.nn.Parameter(torch.zeros(1, cfg.context, cfg.dim))
            self.blocks = torch.nn.ModuleList(Block() for _ in range(cfg.layers))
            self.ln = torch.nn.LayerNorm(cfg.dim)
            self.head = torch.nn.Linear(cfg.dim, VOCAB)
            mask = torch.full((cfg.context, cfg.context), -1e9).triu(1)
            self.register_buffer("causal", mask, persistent=False)

        def forward(self, ids):
            x = self.tok(ids) + self.pos
            for block in self.blocks:
                x = block(x, self.causal)
            return self.head(self.ln(x))

    return TinyLM()


def train_and_export(cfg: LmConfig, folder: Path = LM_DIR) -> tuple[Path, dict[str, Any]]:
    """The trained LM as ONNX (input ``input_ids`` [batch, context] int64 → logits), cached."""
    import torch

    train, _held, corpus = docstring_corpus()
    key = {"recipe": LM_RECIPE, "config": asdict(cfg), "corpus": corpus["sha256"], "torch": torch.__version__}
    path, meta_path = folder / f"tiny_lm_{cfg.tag}.onnx", folder / f"tiny_lm_{cfg.tag}.json"
    if path.exists() and meta_path.exists() and _weights_path(path).exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key and meta.get("file_bytes") == path.stat().st_size:
            return path, meta
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = _model(cfg)
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    data = torch.from_numpy(np.frombuffer(train, dtype=np.uint8).astype(np.int64))
    gen = torch.Generator().manual_seed(cfg.seed)
    start, losses = time.perf_counter(), []
    model.train()
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in optim.param_groups:
            group["lr"] = lr
        offsets = torch.randint(0, len(data) - cfg.context - 1, (cfg.batch,), generator=gen)
        batch = torch.stack([data[o : o + cfg.context + 1] for o in offsets.tolist()])
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        losses.append(float(loss.detach()))
    train_seconds = time.perf_counter() - start
    model.eval()
    check = torch.from_numpy(windows(train, cfg.context, 4, seed=99))
    with torch.no_grad():
        reference = model(check).numpy()
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (check,), str(tmp), input_names=["input_ids"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)
    import onnxruntime as ort

    got = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"]).run(None, {"input_ids": check.numpy()})[0]
    error = float(np.abs(got - reference).max())
    if error > EXPORT_TOLERANCE:
        raise RuntimeError(f"tiny LM export disagrees with torch: max |Δ| {error:.3g}")
    torch.save(model.state_dict(), _weights_path(path))  # recovery.py fine-tunes this very model
    os.replace(tmp, path)
    meta = {"key": key, "file_bytes": path.stat().st_size, "train_seconds": round(train_seconds, 1),
            "final_train_loss": round(float(np.mean(losses[-20:])), 4), "max_abs_error_vs_torch": error,
            "corpus": corpus, "parameters": int(sum(p.numel() for p in model.parameters()))}
    meta_path.write_text(json.dumps(meta, indent=2))
    return path, meta


def _weights_path(onnx_path: Path) -> Path:
    return onnx_path.with_suffix(".pt")


def trained_module(cfg: LmConfig):
    """The trained LM as a torch module (eval mode): the same weights as its cached ONNX export."""
    import torch

    path, _meta = train_and_export(cfg)
    model = _model(cfg)
    model.load_state_dict(torch.load(_weights_path(path), weights_only=True))
    return model.eval()


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    """exp(mean next-byte cross-entropy), every position after the first of each window."""
    z = logits[:, :-1].astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    target = ids[:, 1:]
    nll = -np.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    return float(np.exp(nll.mean()))
