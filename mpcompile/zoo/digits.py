"""The bundled digits models as torch modules (needs the ``torch`` extra).

Kept small on purpose (tens of kB) so they ship inside the package, yet shaped like the
models mpcompile is for: a CNN with BatchNorm, a strided conv, a depthwise conv and a
1-channel stem (the last two must stay dense), a tiny pre-LN ViT whose attention is made of
explicit q/k/v/proj Linear layers (so the ONNX holds plain MatMul nodes with constant
weights, not a fused attention op), and a plain MLP on flattened pixels (a chain of Gemms,
the simplest case for permutation folding).

Only this module imports torch; ``mpcompile.zoo.bundled`` does not, so the package stays
usable without the extra.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from mpcompile.zoo.bundled import bundled_weights_path, check_bundled_name

__all__ = [
    "DigitsCNN", "DigitsViT", "DigitsMLP", "MODEL_CLASSES", "build_model", "load_bundled_module",
]

logger = logging.getLogger(__name__)

IMAGE_SIZE = 8
NUM_CLASSES = 10


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    # No conv bias: BatchNorm's shift replaces it (the exporter folds BN into the conv in eval mode).
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DigitsCNN(nn.Module):
    """``[N,1,8,8]`` → logits ``[N,10]``: stem, two BN convs, depthwise 3×3, pointwise 1×1, 2 FC."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(1, 16),  # stem: Cin=1 < 16, stays dense
            _conv_bn_relu(16, 32),
            _conv_bn_relu(32, 64, stride=2),  # 8×8 → 4×4
            nn.Conv2d(64, 64, 3, padding=1, groups=64),  # depthwise: never 2:4-eligible
            nn.ReLU(),
            nn.Conv2d(64, 64, 1),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class _Block(nn.Module):
    """Pre-LayerNorm transformer block.

    Reshapes use constant token/head counts and ``-1`` for the batch so the legacy exporter
    writes constant Reshape shapes instead of Shape/Gather/Concat chains.
    """

    def __init__(self, dim: int, heads: int, hidden: int, tokens: int) -> None:
        super().__init__()
        self.dim, self.heads, self.tokens = dim, heads, tokens
        self.head_dim = dim // heads
        self.scale = float(self.head_dim) ** -0.5
        self.ln1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def _split_heads(self, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(-1, self.tokens, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        q, k, v = (self._split_heads(layer(h)) for layer in (self.q, self.k, self.v))
        attn = torch.softmax((q * self.scale) @ k.transpose(-1, -2), dim=-1)
        merged = (attn @ v).transpose(1, 2).reshape(-1, self.tokens, self.dim)
        x = x + self.proj(merged)
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class DigitsViT(nn.Module):
    """``[N,1,8,8]`` → 16 tokens of 2×2 pixels → 2 pre-LN blocks → mean pool → logits ``[N,10]``."""

    def __init__(
        self, dim: int = 64, depth: int = 2, heads: int = 4, hidden: int = 128, patch: int = 2
    ) -> None:
        super().__init__()
        self.dim = dim
        self.tokens = (IMAGE_SIZE // patch) ** 2
        self.patch = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, self.tokens, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads, hidden, self.tokens) for _ in range(depth))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).reshape(-1, self.dim, self.tokens).transpose(1, 2) + self.pos
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.ln(tokens).mean(dim=1))


class DigitsMLP(nn.Module):
    """``[N,64]`` (flattened pixels) → 128 → 64 → logits ``[N,10]``: three Gemms, nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(IMAGE_SIZE * IMAGE_SIZE, 128), nn.ReLU(),
            nn.Linear(128, 64), nn.ReLU(),
            nn.Linear(64, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "digits_cnn": DigitsCNN, "digits_vit": DigitsViT, "digits_mlp": DigitsMLP,
}


def build_model(name: str) -> nn.Module:
    """A freshly initialised (untrained) module of one bundled architecture."""
    check_bundled_name(name)
    return MODEL_CLASSES[name]()


def load_bundled_module(name: str) -> nn.Module:
    """The trained bundled model as a torch module in eval mode (for fine-tuning or reference runs)."""
    model = build_model(name)
    state = torch.load(bundled_weights_path(name), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    logger.debug("loaded bundled %s weights (%d tensors)", name, len(state))
    return model.eval()
