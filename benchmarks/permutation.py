"""Channel-permutation efficacy on ASP's reference problem and on transformer-sized layers.

ASP's reference problem (apex ``permutation_tests/permutation_test.py`` defaults, README table):
a random ``128 × 64`` matrix drawn as ``np.random.seed(seed); np.random.rand(128, 64)`` --
**uniform [0, 1)**, rows = filters, columns = the permuted input channels. Seed 1 is ASP's own
instance (its table reports default 2:4 kept 2852.377 and the 50%-rows bound 3042.332, which
this script re-derives as a check). Efficacy is ASP's: the share of the gap between plain 2:4 and
the per-row unstructured 50% bound that a permutation closes.

Anchors (ASP README, that same matrix): ``optimize_stripe_groups,12,0`` 36.6 % (best published,
0.86 s on a V100); ``optimize_stripe_groups,8,0`` 35.5 % in 60.7 s on CPU. Target (DESIGN §5):
≥ 36.6 % in ≤ 1 s on one CPU core. We report the mean and minimum over seeds 1..N, not only the
seed-1 instance, so the figure cannot ride on one lucky matrix.

Larger layers (|N(0, 1)| magnitudes, rows × C = out × reduction): 768×768 (attention
projection), 3072×768 (MLP up: 768 input channels), 768×3072 (MLP down: 3072 input channels),
with 1 s and 2 s budgets. ASP has no published efficacy for these.

BLAS / OpenMP are pinned to one thread before numpy is imported, so each search uses one core.
The search is wall-clock budgeted; on a loaded machine it gets fewer CPU cycles, so the JSON
records the load average and each problem's CPU seconds next to its wall seconds.

Usage::

    python benchmarks/permutation.py            # 10 seeds, large layers × 3 seeds
    python benchmarks/permutation.py --quick    # 3 seeds, large layers × 1 seed
    python benchmarks/permutation.py --out PATH
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script: make `mpcompile` importable
    sys.path.insert(0, str(HERE.parent))

from mpcompile.numerics.permutation import (
    kept_score_24,
    search_permutation,
    unstructured_bound,
)

ASP_BEST_PUBLISHED = 0.366  # optimize_stripe_groups,12,0 -- 0.86 s on a V100
ASP_CPU = 0.355  # optimize_stripe_groups,8,0 -- 60.7 s on CPU
ASP_CPU_SECONDS = 60.653
ASP_SEED1_DEFAULT_24 = 2852.377
ASP_SEED1_BOUND = 3042.332
TARGET_SECONDS = 1.0
LARGE_SHAPES = ((768, 768), (3072, 768), (768, 3072))
LARGE_BUDGETS = (1.0, 2.0)


def asp_matrix(seed: int) -> np.ndarray:
    """Exactly ASP's generator: the legacy global RNG seeded, then ``rand(filters, channels)``."""
    return np.random.RandomState(seed).rand(128, 64)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_one(s: np.ndarray, budget: float, seed: int) -> dict:
    cpu0 = time.process_time()
    result = search_permutation(s, time_budget_s=budget, seed=seed)
    cpu = time.process_time() - cpu0
    return {
        "efficacy": result.efficacy,
        "kept_before": result.kept_before,
        "kept_after": result.kept_after,
        "upper_bound": result.upper_bound,
        "wall_s": result.seconds,
        "cpu_s": cpu,
        "iterations": result.iterations,
    }


def summarise(rows: list[dict]) -> dict:
    eff = [r["efficacy"] for r in rows]
    return {
        "mean_efficacy": statistics.fmean(eff),
        "min_efficacy": min(eff),
        "max_efficacy": max(eff),
        "mean_wall_s": statistics.fmean(r["wall_s"] for r in rows),
        "max_wall_s": max(r["wall_s"] for r in rows),
        "mean_cpu_s": statistics.fmean(r["cpu_s"] for r in rows),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 ASP seeds, 1 seed per large layer")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "permutation.json")
    parser.add_argument(
        "--budget", type=float, default=TARGET_SECONDS, help="seconds per ASP problem"
    )
    args = parser.parse_args(argv)

    n_seeds = 3 if args.quick else 10
    n_large = 1 if args.quick else 3
    load_start = os.getloadavg()

    # --- ASP reference problem
    check = asp_matrix(1)
    baseline_check = {
        "default_24": kept_score_24(check),
        "bound": unstructured_bound(check),
        "asp_default_24": ASP_SEED1_DEFAULT_24,
        "asp_bound": ASP_SEED1_BOUND,
    }
    baseline_check["matches_asp"] = bool(
        abs(baseline_check["default_24"] - ASP_SEED1_DEFAULT_24) < 1e-3
        and abs(baseline_check["bound"] - ASP_SEED1_BOUND) < 1e-3
    )
    asp_rows = []
    print(f"ASP reference problem: 128x64 uniform [0,1), budget {args.budget:g} s, one core")
    print(f"{'seed':>4} {'efficacy':>9} {'wall s':>7} {'cpu s':>6} {'steps':>6}")
    for seed in range(1, n_seeds + 1):
        row = {"seed": seed, **run_one(asp_matrix(seed), args.budget, seed=0)}
        asp_rows.append(row)
        print(
            f"{seed:>4} {100 * row['efficacy']:>8.2f}% {row['wall_s']:>7.3f} "
            f"{row['cpu_s']:>6.3f} {row['iterations']:>6}"
        )
    asp = summarise(asp_rows)
    seed1 = asp_rows[0]["efficacy"]
    print(
        f"mean {100 * asp['mean_efficacy']:.2f}%  min {100 * asp['min_efficacy']:.2f}%  "
        f"seed 1 (ASP's instance) {100 * seed1:.2f}%  max wall {asp['max_wall_s']:.3f} s"
    )
    print(
        f"anchors: ASP best published {100 * ASP_BEST_PUBLISHED:.1f}% (OSG-12, 0.86 s V100); "
        f"ASP CPU {100 * ASP_CPU:.1f}% in {ASP_CPU_SECONDS:.1f} s (OSG-8)"
    )

    # --- larger layers
    large = []
    print("\nLarger layers, |N(0,1)| scores (rows x C, C = permuted input channels)")
    print(f"{'shape':>10} {'budget':>6} {'mean eff':>9} {'min eff':>8} {'max wall':>8}")
    for rows, c in LARGE_SHAPES:
        for budget in LARGE_BUDGETS:
            runs = []
            for seed in range(n_large):
                s = np.abs(np.random.default_rng(seed).standard_normal((rows, c)))
                runs.append({"seed": seed, **run_one(s, budget, seed=0)})
            summary = summarise(runs)
            large.append({"rows": rows, "channels": c, "budget_s": budget, **summary, "runs": runs})
            print(
                f"{rows:>5}x{c:<4} {budget:>6.1f} {100 * summary['mean_efficacy']:>8.2f}% "
                f"{100 * summary['min_efficacy']:>7.2f}% {summary['max_wall_s']:>8.3f}"
            )

    # ASP published seed 1 only; the mean over 3 seeds (--quick) is too noisy to be a target.
    targets = {
        "mean_efficacy_ge_asp_best_published": (
            None if args.quick else asp["mean_efficacy"] >= ASP_BEST_PUBLISHED
        ),
        "seed1_efficacy_ge_asp_best_published": seed1 >= ASP_BEST_PUBLISHED,
        "max_wall_le_1s": asp["max_wall_s"] <= TARGET_SECONDS + 1e-9,
    }
    report = {
        "benchmark": "permutation",
        "mode": "quick" if args.quick else "full",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "cpu_model": cpu_model(),
            "cores_logical": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
        },
        "versions": {"python": platform.python_version(), "numpy": np.__version__},
        "blas_threads": {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
        "asp_reference": {
            "matrix": "np.random.seed(seed); np.random.rand(128, 64) (uniform [0,1), ASP's generator)",
            "seeds": list(range(1, n_seeds + 1)),
            "budget_s": args.budget,
            "baseline_check_seed1": baseline_check,
            **asp,
            "seed1_efficacy": seed1,
            "per_seed": asp_rows,
            "anchors": {
                "asp_best_published": {
                    "efficacy": ASP_BEST_PUBLISHED,
                    "strategy": "optimize_stripe_groups,12,0",
                    "seconds": 0.86,
                    "device": "V100",
                },
                "asp_cpu": {
                    "efficacy": ASP_CPU,
                    "strategy": "optimize_stripe_groups,8,0",
                    "seconds": ASP_CPU_SECONDS,
                    "device": "CPU",
                },
            },
        },
        "large_layers": large,
        "targets": targets,
        "all_targets_pass": all(v for v in targets.values() if v is not None),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\ntargets: {targets}\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
