"""Real architectures with random weights, exported here with both torch exporters.

Why here and not downloaded: the conformance suite (issue 11 part 6) asks whether mpcompile
handles what the exporters *write* for real architectures; trained weights add nothing to
that and no test may download. ``transformers`` models are built from small configs; the
torchvision ones at their real size (the CI subset uses small ones).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ModelCase", "CASES", "export_case", "import_torchvision"]


def import_torchvision():
    """``import torchvision`` on a CPU-only torch.

    Why the shim: the only torchvision wheel matching torch 2.13 here (0.28.0) is a CUDA
    build whose C ops cannot load against CPU torch, so its import dies registering fake
    kernels (``operator torchvision::nms does not exist``). Classification models need no
    C op, so ``torch.library.register_fake`` is a no-op decorator during the import.
    """
    import sys

    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    import torch

    original = torch.library.register_fake

    def _no_op(*_args, **_kwargs):
        return lambda fn: fn

    torch.library.register_fake = _no_op
    try:
        import torchvision
    finally:
        torch.library.register_fake = original
    return torchvision


def _transformers():
    """``transformers`` imports torchvision when it is installed: through the shim first."""
    import_torchvision()
    import transformers

    return transformers


@dataclass(frozen=True)
class ModelCase:
    """One architecture: how to build it and the example inputs to export it with."""

    name: str
    build: Callable[[], tuple[object, tuple, list[str], dict[str, dict[int, str]]]]
    quick: tuple[str, ...] = ()  # exporters ("legacy", "dynamo") of the fast CI subset
    subgraphs: bool = False  # its export holds If/Loop bodies (needs subgraph support)


def _vision(arch: str, size: int = 224, **kwargs):
    def build():
        import torch

        tv = import_torchvision()
        torch.manual_seed(0)
        model = getattr(tv.models, arch)(weights=None, **kwargs)
        return model, (torch.randn(1, 3, size, size),), ["input"], {"input": {0: "batch"}}

    return build


def _tokens(vocab: int, seq: int = 16):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, seq), generator=g)
    return ids, torch.ones_like(ids)


_TEXT = ("input_ids", "attention_mask")
_TEXT_AXES = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}


class _Plain:
    """``forward`` returning plain tensors (exporters cannot return ModelOutput/Cache)."""

    @staticmethod
    def wrap(module, names: tuple[str, ...], keys: tuple[str, ...] = ("last_hidden_state",)):
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = module

            def forward(self, *args):
                out = self.inner(**dict(zip(names, args, strict=True)), return_dict=True)
                return tuple(out[k] for k in keys)

        return Wrapped().eval()


def _bert():
    tf = _transformers()

    config = tf.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=128, max_position_embeddings=64)
    return _Plain.wrap(tf.BertModel(config), _TEXT), _tokens(100), ["input_ids", "attention_mask"], _TEXT_AXES


def _distilbert():
    tf = _transformers()

    config = tf.DistilBertConfig(vocab_size=100, dim=64, n_layers=2, n_heads=2, hidden_dim=128,
                                 max_position_embeddings=64)
    return _Plain.wrap(tf.DistilBertModel(config), _TEXT), _tokens(100), ["input_ids", "attention_mask"], _TEXT_AXES


def _gpt2():
    tf = _transformers()

    config = tf.GPT2Config(vocab_size=100, bos_token_id=0, eos_token_id=0, n_embd=64, n_layer=2, n_head=2, n_positions=64, use_cache=False)
    return _Plain.wrap(tf.GPT2Model(config), _TEXT), _tokens(100), ["input_ids", "attention_mask"], _TEXT_AXES


def _t5_encoder():
    tf = _transformers()

    config = tf.T5Config(vocab_size=100, d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2)
    return _Plain.wrap(tf.T5EncoderModel(config), _TEXT), _tokens(100), ["input_ids", "attention_mask"], _TEXT_AXES


def _whisper_encoder():
    import torch
    tf = _transformers()

    config = tf.WhisperConfig(vocab_size=100, d_model=64, encoder_layers=2, encoder_attention_heads=2,
                              decoder_layers=1, decoder_attention_heads=2, encoder_ffn_dim=128,
                              decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=32,
                              pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=0)
    encoder = tf.WhisperModel(config).get_encoder()
    features = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0))
    return _Plain.wrap(encoder, ("input_features",)), (features,), ["input_features"], {"input_features": {0: "batch"}}


def _llama_kv():
    """A Llama-style decoder step with its KV cache as explicit inputs (past keys/values)."""
    import torch
    tf = _transformers()

    config = tf.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = tf.LlamaForCausalLM(config).eval()
    layers, heads, dim = config.num_hidden_layers, config.num_key_value_heads, 64 // 4

    class Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids, past_keys, past_values):
            cache = tf.DynamicCache(config=config)
            for i in range(layers):
                cache.update(past_keys[i], past_values[i], i)
            out = self.inner(input_ids=input_ids, past_key_values=cache, use_cache=True, return_dict=True)
            return out.logits

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (1, 1), generator=g)
    past = torch.randn(layers, 1, heads, 8, dim, generator=g)
    return (Step().eval(), (ids, past, past.clone()), ["input_ids", "past_keys", "past_values"],
            {"input_ids": {0: "batch"}, "past_keys": {1: "batch", 3: "past"}, "past_values": {1: "batch", 3: "past"}})


def _control_flow():
    """A block whose two paths are chosen by data (``torch.cond`` → ONNX If), with Linear
    layers in both branches, as gated/early-exit models export."""
    import torch

    class Gated(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a = torch.nn.Linear(64, 64)
            self.b = torch.nn.Linear(64, 64)
            self.head = torch.nn.Linear(64, 32)

        def forward(self, x):
            h = torch.cond(x.sum() > 0, lambda t: torch.relu(self.a(t)), lambda t: torch.tanh(self.b(t)), (x,))
            return self.head(h)

    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    return Gated().eval(), (x,), ["x"], {"x": {0: "batch"}}


def _small_cnn():
    import torch

    tv = import_torchvision()
    torch.manual_seed(0)
    model = tv.models.mobilenet_v3_small(weights=None, num_classes=64)
    return model, (torch.randn(1, 3, 64, 64),), ["input"], {"input": {0: "batch"}}


_BOTH = ("legacy", "dynamo")
CASES: tuple[ModelCase, ...] = (
    ModelCase("mobilenet_v3_small_64px", _small_cnn, quick=("legacy",)),
    ModelCase("resnet50", _vision("resnet50")),
    ModelCase("mobilenet_v3_large", _vision("mobilenet_v3_large")),
    ModelCase("efficientnet_b0", _vision("efficientnet_b0")),
    ModelCase("convnext_tiny", _vision("convnext_tiny")),
    ModelCase("regnet_y_400mf", _vision("regnet_y_400mf")),
    ModelCase("vit_b_16", _vision("vit_b_16")),
    ModelCase("swin_t", _vision("swin_t")),
    ModelCase("maxvit_t", _vision("maxvit_t")),
    ModelCase("bert_tiny", _bert, quick=_BOTH),
    ModelCase("distilbert_tiny", _distilbert),
    ModelCase("gpt2_tiny", _gpt2, quick=("legacy",)),
    ModelCase("t5_encoder_tiny", _t5_encoder),
    ModelCase("whisper_encoder_tiny", _whisper_encoder),
    ModelCase("llama_kv_tiny", _llama_kv, quick=_BOTH),
    ModelCase("cond_if", _control_flow, quick=_BOTH, subgraphs=True),
)


def export_case(case: ModelCase, path: Path, *, dynamo: bool) -> Path:
    """Export ``case`` to ``path``; raises whatever the exporter raises (the caller records it)."""
    import torch

    module, args, names, axes = case.build()
    module.eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(None):
        warnings.simplefilter("ignore")
        if dynamo:
            shapes = tuple({axis: torch.export.Dim.AUTO for axis in axes.get(name, {})} for name in names)
            params = inspect.signature(module.forward).parameters.values()
            if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
                shapes = (shapes,)  # forward(*args): one positional structure holding them all
            program = torch.onnx.export(module, args, dynamo=True, input_names=names, dynamic_shapes=shapes,
                                        verbose=False)
            program.save(str(path))
        else:
            torch.onnx.export(module, args, str(path), dynamo=False, input_names=names, dynamic_axes=axes,
                              opset_version=17)
    return path
