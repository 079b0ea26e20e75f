"""Seed methods (unstructured): parameters removed vs accuracy, and spectral error vs drift.

    python benchmarks/seed_methods.py [--quick]

For each bundled digits model and removed fraction, compiles with rmt-sv (seed 000),
spectral-sample (seed 003) and magnitude-unstructured (baseline), measures test accuracy and
output drift, and the mean relative spectral error ‖W − W_s‖₂/‖W‖₂ of the pruned layers.
Across all (method, fraction) runs of a model it reports the Spearman rank correlation of
spectral error with output drift (seed 003's claim: spectrum preservation predicts quality).
Writes benchmarks/results/seed_methods.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mpcompile.pipeline import CompileOptions, compile_model  # noqa: E402
from mpcompile.zoo.bundled import bundled_model_path, write_split_npz  # noqa: E402

METHODS = ("magnitude-unstructured", "rmt-sv", "spectral-sample")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one model, two fractions")
    args = parser.parse_args()
    models = ("digits_cnn",) if args.quick else ("digits_cnn", "digits_vit", "digits_mlp")
    fractions = (0.3, 0.6) if args.quick else (0.2, 0.4, 0.5, 0.6, 0.7)
    rows, correlations = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            calib = write_split_npz("calib", Path(tmp) / f"{name}_c.npz", model=name)
            test = write_split_npz("test", Path(tmp) / f"{name}_t.npz", model=name)
            spectral, drift = [], []
            for fraction in fractions:
                for method in METHODS:
                    result = compile_model(bundled_model_path(name), CompileOptions(
                        method=method, sparsity=fraction, calib=str(calib), eval_data=str(test),
                        output=str(Path(tmp) / f"{name}_{method}_{fraction}.onnx")))
                    err = float(np.mean([s["relative_spectral_error"] for s in result.spectra().values()]))
                    v = result.validation
                    rows.append({"model": name, "method": method, "removed_fraction": fraction,
                                 "dense_accuracy": v.dense_accuracy, "accuracy": v.sparse_accuracy,
                                 "relative_l2_drift": v.relative_l2, "mean_relative_spectral_error": err})
                    spectral.append(err)
                    drift.append(v.relative_l2)
                    print(f"{name:11s} {method:22s} {fraction:.1f}  acc {100 * v.sparse_accuracy:6.2f}%  "
                          f"drift {v.relative_l2:.4f}  spectral err {err:.4f}")
            rho = spearmanr(spectral, drift).statistic
            correlations[name] = float(rho)
            print(f"{name}: Spearman(spectral error, output drift) = {rho:.3f}")
    out = {"benchmark": "seed_methods", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python benchmarks/seed_methods.py" + (" --quick" if args.quick else ""),
           "machine": {"platform": platform.platform(), "python": platform.python_version()},
           "rows": rows, "spearman_spectral_error_vs_drift": correlations}
    suffix = "_quick" if args.quick else ""
    (HERE / "results" / f"seed_methods{suffix}.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["| model | method | removed | accuracy | drift | spectral err |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['method']} | {r['removed_fraction']:.1f} | {100 * r['accuracy']:.2f}% "
              f"(dense {100 * r['dense_accuracy']:.2f}%) | {r['relative_l2_drift']:.4f} | "
              f"{r['mean_relative_spectral_error']:.4f} |" for r in rows]
    lines += ["", "Spearman rank correlation of spectral error with output drift: "
              + ", ".join(f"{k} {v:.3f}" for k, v in correlations.items())]
    (HERE / "results" / f"seed_methods{suffix}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
