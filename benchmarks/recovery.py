"""Recovery after one-shot 2:4: frozen-mask distillation of MiniLM and the tiny decoder LM.

Why: one-shot quality (``quality.py``) is what a user gets with no training; the next
question a deployment engineer asks is how much a short fine-tune with the 2:4 pattern
frozen gives back (seed 001 reports ViT-B within 1.7 pp after 3 epochs). Protocol, per model:

1. compile the dense ONNX with mpcompile's default data method (``cast-obs``) at every
   eligible layer (target 1.0), *without* channel permutation: a permutation changes the
   exported weight order, which the torch module does not share, so the masks could not be
   carried back (``mpcompile.api.apply_masks_to_torch``);
2. carry the masks *and* the updated kept weights onto the torch model
   (``mpcompile.finetune.masks_from_compile(load_weights=True)``; cast-obs updates the
   weights it keeps, as SparseGPT does), check that torch now reproduces the one-shot file, and
   distil the dense model into it (``mpcompile.finetune.distil``: AdamW, cosine schedule
   over the 3 epochs, masked weights re-zeroed after every step), scoring after epochs 1
   and 3 (epoch 0 = the one-shot model);
3. export the fine-tuned model to ONNX, check its 2:4 layers with ``mpcompile check`` and
   score that file with ONNX Runtime: the number reported for "3 epochs (ONNX)" is the
   deployable model's.

Metrics are those of ``quality.py`` on the same evaluation data: MiniLM's mean cosine and
pairwise Spearman vs the dense embeddings (240 template sentences) and recall@1 as a
128-token retriever; the LM's held-out perplexity per byte. Training text is never
evaluation text: MiniLM's retrieval passages come from the *training* modules' docstrings
and its similarity sentences are templates, so it trains on sentences of the held-out
modules' docstrings; the LM trains on other windows of its own training text (its
perplexity is on the held-out modules).

    python benchmarks/recovery.py            # MiniLM + the LM (~15 min on 2 cores)
    python benchmarks/recovery.py --quick    # the quick LM only, 1 epoch (< 1 min)

Writes ``benchmarks/results/recovery.json`` and ``recovery.md`` (``recovery_quick.*``).
"""

from __future__ import annotations

import argparse
import copy
import logging
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script: make `benchmarks` and `mpcompile` importable
    sys.path.insert(0, str(HERE.parent))

from benchmarks.analyze_speed import run_header, save_results

logger = logging.getLogger("recovery")
RESULTS_DIR = HERE / "results"
EPOCHS = 3
SCORED_EPOCHS = (1, 3)
METHOD = "cast-obs"  # mpcompile's default data method
MINILM_TRAIN_LENGTH = 32  # tokens per training sentence
LM_TRAIN_WINDOWS = 2048


@dataclass
class RecoveryRun:
    """One model's quality before and after fine-tuning (``epochs`` → metrics)."""

    model: str
    metrics: list[str]
    primary: str
    lower_is_better: bool
    dense: dict[str, float]
    oneshot_onnx: dict[str, float]  # the compiled one-shot file, scored with ONNX Runtime
    by_epoch: dict[int, dict[str, float]] = field(default_factory=dict)  # torch; 0 = one-shot masks applied
    final_onnx: dict[str, float] = field(default_factory=dict)
    check_ok: bool = False
    marked_nodes: int = 0
    sparse_layers: int = 0
    masked_parameters: int = 0
    masked_nonzeros: int = -1
    epoch_losses: list[float] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    training: str = ""
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class Recipe:
    """What differs between models: how a batch goes through torch, the loss, the scoring."""

    name: str
    onnx_path: Path
    calib: Path
    teacher: Any
    train_inputs: dict[str, np.ndarray]
    forward: Callable
    loss: Callable
    score_torch: Callable[[Any], dict[str, float]]
    score_onnx: Callable[[Path], dict[str, float]]
    export: Callable[[Any, Path, dict], tuple[Path, list[str]]]
    metrics: tuple[str, ...]
    primary: str
    lower_is_better: bool
    lr: float
    batch_size: int
    training: str


def run_recovery(recipe: Recipe, folder: Path, epochs: int, scored: tuple[int, ...]) -> RecoveryRun:
    """Compile one-shot, carry the masks to torch, distil, export and check (see the module doc)."""
    import torch

    from mpcompile.checks.checker import check_model
    from mpcompile.finetune import FinetuneOptions, apply_masks, distil, masks_from_compile
    from mpcompile.pipeline import CompileOptions, compile_model

    times: dict[str, float] = {}
    start = time.perf_counter()
    result = compile_model(recipe.onnx_path, CompileOptions(method=METHOD, permute=False, target=1.0,
                                                            calib=str(recipe.calib),
                                                            output=str(folder / f"{recipe.name}.oneshot.onnx")))
    times["compile"] = round(time.perf_counter() - start, 1)
    torch.manual_seed(0)
    student = copy.deepcopy(recipe.teacher).eval()
    masks = masks_from_compile(student, result, load_weights=True)
    if len(masks) != len(result.masks):
        raise RuntimeError(f"{recipe.name}: {len(result.masks)} 2:4 layers but only {len(masks)} torch weights matched")
    apply_masks(student, masks)
    run = RecoveryRun(recipe.name, list(recipe.metrics), recipe.primary, recipe.lower_is_better,
                      dense=recipe.score_torch(recipe.teacher), oneshot_onnx=recipe.score_onnx(result.output_path),
                      sparse_layers=len(result.masks), training=recipe.training)
    run.by_epoch[0] = recipe.score_torch(student)
    torch_value, onnx_value = run.by_epoch[0][recipe.primary], run.oneshot_onnx[recipe.primary]
    if abs(torch_value - onnx_value) > 1e-3 * max(abs(onnx_value), 1.0):
        raise RuntimeError(f"{recipe.name}: torch with the compiled weights scores {torch_value:.5g}, the compiled "
                           f"file {onnx_value:.5g}: the one-shot model did not carry over")
    print(f"  one-shot ({len(masks)} layers 2:4): torch {run.by_epoch[0]}  onnx {run.oneshot_onnx}", flush=True)

    def on_epoch(done: int, module: Any) -> None:
        if done in scored:
            run.by_epoch[done] = recipe.score_torch(module)
            print(f"  epoch {done}: {run.by_epoch[done]}  ({time.perf_counter() - start:.0f} s)", flush=True)

    options = FinetuneOptions(epochs=epochs, lr=recipe.lr, batch_size=recipe.batch_size, seed=0)
    start = time.perf_counter()
    trained = distil(student, recipe.teacher, recipe.train_inputs, masks, loss=recipe.loss, forward=recipe.forward,
                     options=options, on_epoch=on_epoch)
    times["finetune"] = round(time.perf_counter() - start, 1)
    path, marked = recipe.export(student, folder / f"{recipe.name}.finetuned.onnx", masks)
    check = check_model(path)
    run.final_onnx = recipe.score_onnx(path)
    run.check_ok, run.marked_nodes = bool(check.ok and check.marked), len(marked)
    run.masked_parameters, run.masked_nonzeros = len(trained.masked_parameters), trained.masked_nonzeros
    run.epoch_losses = [round(x, 6) for x in trained.epoch_losses]
    run.options, run.seconds = asdict(options), times
    print(f"  exported: {run.final_onnx}, check ok {run.check_ok}, {run.marked_nodes} nodes marked 2:4", flush=True)
    return run


# ------------------------------------------------------------------------------ tiny LM


def lm_recipe(folder: Path, quick: bool) -> Recipe:
    import torch

    from benchmarks import quality, quality_lm
    from mpcompile.finetune import distillation_loss, export_masked_onnx

    cfg = quality_lm.QUICK if quick else quality_lm.FULL
    onnx_path, _meta = quality_lm.train_and_export(cfg)
    teacher = quality_lm.trained_module(cfg)
    train, held, _corpus = quality_lm.docstring_corpus()
    calib = folder / "lm_calib.npz"
    np.savez(calib, input_ids=quality_lm.windows(train, cfg.context, quality.LM_CALIB_WINDOWS, seed=11))
    ids = quality_lm.windows(held, cfg.context, quality.LM_EVAL_WINDOWS, seed=12)
    count = 256 if quick else LM_TRAIN_WINDOWS
    # windows one byte longer: the input is the first `context` bytes, the labels the next ones
    framed = quality_lm.windows(train, cfg.context + 1, count, seed=21)

    @torch.no_grad()
    def score_torch(module: Any) -> dict[str, float]:
        logits = torch.cat([module(torch.from_numpy(ids[i : i + 128])) for i in range(0, len(ids), 128)])
        return {"perplexity": quality_lm.perplexity(logits.numpy(), ids)}

    def loss(student: Any, teacher_logits: Any, batch: dict[str, Any]) -> Any:
        vocab = student.shape[-1]
        return distillation_loss(student.reshape(-1, vocab), teacher_logits.reshape(-1, vocab),
                                 batch["labels"].reshape(-1), alpha=0.5, tau=2.0)

    def export(module: Any, path: Path, masks: dict) -> tuple[Path, list[str]]:
        example = torch.from_numpy(ids[:2])
        return export_masked_onnx(module, example, path, masks, input_names=("input_ids",), output_names=("logits",))

    return Recipe(
        name=f"tiny-lm-{cfg.tag}", onnx_path=onnx_path, calib=calib, teacher=teacher,
        train_inputs={"ids": framed[:, :-1], "labels": framed[:, 1:]},
        forward=lambda module, batch: module(batch["ids"]), loss=loss, score_torch=score_torch,
        score_onnx=lambda path: {"perplexity": quality_lm.perplexity(
            quality._run_ort(path, {"input_ids": ids}), ids)},
        export=export, metrics=("perplexity",), primary="perplexity", lower_is_better=True,
        lr=5e-4, batch_size=32,
        training=f"{count} windows of {cfg.context} bytes of the LM's training text (not the held-out modules); "
                 "loss ½·CE(next byte) + ½·τ²·KL(teacher ‖ student), τ 2, per position")


# ------------------------------------------------------------------------------ MiniLM


def docstring_sentences(text: bytes, count: int, seed: int = 0) -> list[str]:
    """``count`` prose sentences (6–40 words) from docstring text, in a seeded order."""
    words = re.sub(r"\s+", " ", text.decode("ascii")).split(". ")
    pool = sorted({s.strip() + "." for s in words if 6 <= len(s.split()) <= 40 and s[:1].isalpha()})
    order = np.random.default_rng(seed).permutation(len(pool))[:count]
    return [pool[i] for i in order]


def minilm_recipe(folder: Path, sentences: int) -> Recipe:
    from benchmarks import quality, quality_lm

    model_dir, _version = quality._minilm_source()  # before transformers is imported (offline, torchvision)
    import torch
    from transformers import AutoModel

    from mpcompile.finetune import export_masked_onnx

    onnx_path, _meta = quality.export_minilm()
    tokenizer = quality._tokenizer(model_dir)
    teacher = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    calib = folder / "minilm_calib.npz"
    np.savez(calib, **quality._encode(tokenizer, quality.calib_sentences(), length=quality.CALIB_LENGTH))
    eval_tokens = quality._encode(tokenizer, quality.eval_sentences())
    # Training sentences come from the held-out modules (which quality.py's MiniLM runs only
    # calibrate on), so they share no text with the retrieval passages of the training modules.
    train_text, held_text, _corpus = quality_lm.docstring_corpus()
    train_tokens = quality._encode(tokenizer, docstring_sentences(held_text, sentences), length=MINILM_TRAIN_LENGTH)
    queries, index = _retrieval_sets(tokenizer, train_text)
    dense_q = quality.mean_pooled(quality._run_ort(onnx_path, queries), queries["attention_mask"])
    dense_index = quality.mean_pooled(quality._run_ort(onnx_path, index), index["attention_mask"])
    dense_eval = quality.mean_pooled(quality._run_ort(onnx_path, eval_tokens), eval_tokens["attention_mask"])

    def hidden(module: Any, batch: dict[str, Any]) -> Any:
        return module(**{k: batch[k] for k in quality.MINILM_INPUTS}).last_hidden_state

    def scores(embed: Callable[[dict[str, np.ndarray]], np.ndarray]) -> dict[str, float]:
        agreement = quality.embedding_agreement(dense_eval, embed(eval_tokens))
        return {**agreement, "recall_at_1": quality.retrieval(embed(queries), dense_index)["recall_at_1"]}

    @torch.no_grad()
    def score_torch(module: Any) -> dict[str, float]:
        def embed(tokens: dict[str, np.ndarray]) -> np.ndarray:
            parts = [hidden(module, {k: torch.from_numpy(v[i : i + 64]) for k, v in tokens.items()}).numpy()
                     for i in range(0, len(tokens["input_ids"]), 64)]
            return quality.mean_pooled(np.concatenate(parts), tokens["attention_mask"])
        return scores(embed)

    def score_onnx(path: Path) -> dict[str, float]:
        return scores(lambda tokens: quality.mean_pooled(quality._run_ort(path, tokens), tokens["attention_mask"]))

    def loss(student: Any, teacher_hidden: Any, batch: dict[str, Any]) -> Any:
        """Mean squared error of the last hidden states over real (unpadded) tokens."""
        real = batch["attention_mask"].unsqueeze(-1).to(student.dtype)
        return (((student - teacher_hidden) ** 2) * real).sum() / (real.sum() * student.shape[-1])

    class LastHidden(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    def export(module: Any, path: Path, masks: dict) -> tuple[Path, list[str]]:
        example = tuple(torch.from_numpy(eval_tokens[k][:2]) for k in quality.MINILM_INPUTS)
        axes = {name: {0: "batch", 1: "sequence"} for name in (*quality.MINILM_INPUTS, "last_hidden_state")}
        prefixed = {f"inner.{name}": keep for name, keep in masks.items()}
        return export_masked_onnx(LastHidden(module), example, path, prefixed, input_names=quality.MINILM_INPUTS,
                                  output_names=("last_hidden_state",), dynamic_axes=axes)

    return Recipe(
        name="all-MiniLM-L6-v2", onnx_path=onnx_path, calib=calib, teacher=teacher, train_inputs=train_tokens,
        forward=hidden, loss=loss, score_torch=score_torch, score_onnx=score_onnx, export=export,
        metrics=("mean_cosine", "pairwise_spearman", "recall_at_1"), primary="mean_cosine", lower_is_better=False,
        lr=1e-4, batch_size=32,
        training=f"{sentences} sentences of the held-out stdlib modules' docstrings at {MINILM_TRAIN_LENGTH} tokens; "
                 "loss: MSE of the last hidden states to the dense model's, real tokens only")


def _retrieval_sets(tokenizer: Any, text: bytes) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """quality.py's 128-token query/match passage pairs (same construction, same constants)."""
    from benchmarks import quality

    chunks = quality._chunks(tokenizer, text, quality.RETRIEVAL_LENGTH)
    step = max(2, (len(chunks) - 1) // quality.RETRIEVAL_PAIRS)
    starts = list(range(0, len(chunks) - 1, step))[: quality.RETRIEVAL_PAIRS]
    return (quality._framed(tokenizer, [chunks[i] for i in starts]),
            quality._framed(tokenizer, [chunks[i + 1] for i in starts]))


# ------------------------------------------------------------------------------ report


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Recovery after one-shot 2:4 ({'quick' if report['mode'] == 'quick' else 'full'})", "",
             f"{report['date']} · {report['machine']['cpu_model']} · {report['machine']['cores_usable']} cores · "
             f"`{report['command']}` · mpcompile {report['versions'].get('git_commit', '?')}", "",
             f"One-shot: `mpcompile compile --method {METHOD} --no-permute --target 1.0` (every eligible layer 2:4, "
             "FP32, no permutation so the masks map back to torch). Then frozen-mask distillation "
             f"(`mpcompile.finetune.distil`, AdamW, cosine schedule over {report['epochs']} epoch(s), masked weights "
             "re-zeroed after every step). *0* = one-shot masks on the torch model; *ONNX* = the fine-tuned model "
             "exported, checked by `mpcompile check` and scored with ONNX Runtime.", ""]
    for run in report["runs"]:
        by_epoch = {int(e): v for e, v in run["by_epoch"].items()}
        epochs = sorted(by_epoch)
        lines += [f"## {run['model']}", "", f"Training: {run['training']}.", "",
                  "| metric | dense | one-shot (ONNX) | " + " | ".join(f"{e} ep" for e in epochs)
                  + f" | {report['epochs']} ep (ONNX) |",
                  "|---|---|---|" + "---|" * len(epochs) + "---|"]
        for metric in run["metrics"]:
            row = [run["dense"].get(metric), run["oneshot_onnx"].get(metric),
                   *[by_epoch[e].get(metric) for e in epochs],
                   run["final_onnx"].get(metric)]
            arrow = "↓" if run["lower_is_better"] else "↑"
            lines.append(f"| {metric} {arrow} | " + " | ".join(_fmt(v) for v in row) + " |")
        lines += ["", f"- {run['sparse_layers']} layers 2:4; {run['masked_parameters']} torch weights masked, "
                      f"{run['masked_nonzeros']} non-zeros under the masks after training; exported file: "
                      f"check {'passed' if run['check_ok'] else 'FAILED'}, {run['marked_nodes']} nodes marked 2:4",
                  f"- epoch losses {run['epoch_losses']}; lr {run['options']['lr']}, batch "
                  f"{run['options']['batch_size']}; seconds {run['seconds']}", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick LM only, 1 epoch (< 1 min)")
    parser.add_argument("--models", nargs="*", choices=("tiny_lm", "minilm"), help="default: both (--quick: tiny_lm)")
    parser.add_argument("--sentences", type=int, default=1024, help="MiniLM training sentences (default 1024)")
    parser.add_argument("-o", "--output", type=Path, help="JSON path (default benchmarks/results/recovery[_quick].json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    models = args.models or (["tiny_lm"] if args.quick else ["minilm", "tiny_lm"])
    epochs, scored = (1, (1,)) if args.quick else (EPOCHS, SCORED_EPOCHS)
    t0 = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="mpc_recovery_") as tmp:
        folder = Path(tmp)
        for name in models:
            recipe = lm_recipe(folder, args.quick) if name == "tiny_lm" else minilm_recipe(folder, args.sentences)
            print(f"== {recipe.name}: {recipe.training}", flush=True)
            runs.append(asdict(run_recovery(recipe, folder, epochs, scored)))
    report = {**run_header("recovery", args.quick), "method": METHOD, "epochs": epochs, "runs": runs,
              "seconds": round(time.perf_counter() - t0, 1)}
    out = args.output or RESULTS_DIR / f"recovery{'_quick' if args.quick else ''}.json"
    save_results(report, out, markdown(report))
    print(f"saved {out} and {out.with_suffix('.md')} ({report['seconds']} s)")
    failed = [r["model"] for r in runs if not r["check_ok"] or r["masked_nonzeros"] != 0]
    if failed:
        print(f"masks did not hold or the exported file failed the check: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
