"""Which layers to make 2:4 under one accuracy budget: uniform vs MP vs drift order vs the layer choice.

Why this shape (issue 13, part 2 and the "uniform vs chosen layers" ablation): a user gives an
accuracy budget (``--max-drift D``, relative L2 output drift on calibration data) and wants the
most speed within it. Every arm here gets the *same* budget and the same mask method (the
default, cast-obs + permutation); only the layer choice differs:

- ``uniform (graph)``, ``mp order``, ``drift order``: ``--order X --max-drift D`` keeps the longest
  prefix of that order within D (the selection before this issue);
- ``choice (MACs)``: the new default for ``--max-drift`` with ``--calib``: greedy by MACs per
  measured drift² increase, re-measured on the accumulated model, MP rank ordering near-ties;
- ``choice (MACs, no MP prior)``: the same with graph order breaking the ties — does the prior help?
- ``choice --gpu A100``: gain = modeled µs saved on an A100 (FP16 roofline at the benchmark shapes),
  with and without the MP prior.

Reported per arm: the model's quality metric (from ``benchmarks/quality.py``'s scorers: digits
test accuracy, MiniLM embedding cosine and pairwise Spearman), the fraction of eligible MACs made
2:4, the pipeline's measured drift and the *modeled* end-to-end A100 speedup at FP16 (not measured).

Usage::

    python benchmarks/layer_choice.py            # MiniLM (1 budget, ~30 min on 2 busy cores) + digits_vit (3)
    python benchmarks/layer_choice.py --quick    # digits_vit at one budget (~1 min)

Writes ``benchmarks/results/layer_choice[_quick].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from benchmarks.analyze_speed import run_header, save_results

logger = logging.getLogger("layer_choice")

RESULTS_DIR = HERE / "results"
GPU = "A100-SXM4-80GB"
BUDGETS = {"minilm": (0.1,), "digits_vit": (0.03, 0.06, 0.09)}
QUICK_BUDGETS = {"digits_vit": (0.06,)}
SHAPES = {"digits_vit": {"N": 32}, "minilm": {"batch": 32, "sequence": 128}}
"""Shapes the speed model is evaluated at (batch 32; MiniLM at 128 tokens: 4096 GEMM rows)."""
PERM_STEPS = 60  # a step count, not the clock: every arm gets the same masks for the same layer


@dataclass(frozen=True)
class Arm:
    label: str
    order: str | None  # None: the default (choice with --max-drift and --calib)
    gpu: str | None = None
    prior: str = "mp"


ARMS = (
    Arm("uniform (graph)", "graph"),
    Arm("mp order", "mp"),
    Arm("drift order", "drift"),
    Arm("choice (MACs)", None),
    Arm("choice (MACs, no MP prior)", None, prior="graph"),
    Arm(f"choice --gpu {GPU}", None, GPU),
    Arm(f"choice --gpu {GPU}, no MP prior", None, GPU, "graph"),
)


def run_arm(bench, arm: Arm, budget: float, dims: dict[str, int], out_dir: Path) -> dict[str, Any]:
    from mpcompile.io.shapes import ShapeSpec
    from mpcompile.pipeline import CompileOptions, compile_model
    from mpcompile.selection.gain import modeled_total_speedup

    out = out_dir / f"{bench.name}.{arm.order or 'choice'}.{arm.gpu or 'macs'}.{arm.prior}.{budget:g}.onnx"
    record: dict[str, Any] = {"model": bench.name, "arm": arm.label, "max_drift": budget, **asdict(arm)}
    start = time.perf_counter()
    try:
        result = compile_model(bench.path, CompileOptions(
            order=arm.order, gpu=arm.gpu, choice_prior=arm.prior, max_drift=budget, calib=str(bench.calib),
            eval_data=str(bench.eval_data) if bench.eval_data else None, shape_spec=ShapeSpec(dims=dict(dims)),
            perm_steps=PERM_STEPS, output=str(out)))
        sparse = set(result.selection.selected_names)
        choice = result.selection.choice
        record.update({
            "metrics": bench.score(result, result.output_path),
            "order_used": result.selection.order,
            "sparse_layers": len(sparse),
            "sparse_fraction_of_eligible": round(result.selection.selected_fraction, 4),
            "modeled_speedup_a100_fp16": modeled_total_speedup(result.analysis.result.layers, sparse, GPU,
                                                               result.analysis.shapes),
            "validation_relative_l2": result.validation.relative_l2,
            "validation_data": result.eval_source,
            "choice_drift_on_calibration": choice["drift_on_calibration"] if choice else None,
            "choice_evaluations": choice["evaluations"] if choice else None,
            "seconds": result.seconds,
        })
    except Exception as exc:
        logger.exception("%s / %s / %g failed", bench.name, arm.label, budget)
        record["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        for path in (out, Path(str(out) + ".report.json")):
            path.unlink(missing_ok=True)
    record["wall_s"] = round(time.perf_counter() - start, 2)
    return record


def _fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.2f} %" if metric == "test_accuracy" else f"{value:.4f}"


def verdicts(model: dict[str, Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per budget: does the default choice beat uniform on the primary metric and the modeled speed?
    Does the MP prior change anything?"""
    primary, out = model["primary_metric"], []
    for budget in model["budgets"]:
        mine = {r["arm"]: r for r in runs if r["model"] == model["name"] and r["max_drift"] == budget and "metrics" in r}
        if not mine:
            continue
        value = lambda label, key="metric": (None if label not in mine else mine[label]["metrics"][primary]
                                             if key == "metric" else mine[label][key])
        row = {"max_drift": budget}
        for label, base in (("choice (MACs)", "uniform (graph)"), (f"choice --gpu {GPU}", "uniform (graph)")):
            row[f"{label} vs uniform"] = {
                "metric": [value(label), value(base)],
                "macs_fraction": [value(label, "sparse_fraction_of_eligible"), value(base, "sparse_fraction_of_eligible")],
                "modeled_speedup": [value(label, "modeled_speedup_a100_fp16"), value(base, "modeled_speedup_a100_fp16")],
            }
        row["mp prior changes the MACs choice"] = (mine.get("choice (MACs)", {}).get("sparse_fraction_of_eligible")
                                                   != mine.get("choice (MACs, no MP prior)", {}).get("sparse_fraction_of_eligible")
                                                   or value("choice (MACs)") != value("choice (MACs, no MP prior)"))
        out.append(row)
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Layer choice under an accuracy budget ({report['mode']})", "",
             f"{report['date']} · {report['machine']['cpu_model']} · `{report['command']}` · "
             f"mpcompile {report['versions'].get('git_commit', '')}", "",
             ("Every arm: default mask method (cast-obs + permutation), the same `--max-drift` budget (relative L2 "
              "output drift on calibration data). *uniform / mp / drift order*: the longest prefix of that order "
              "within the budget. *choice*: the new default for `--max-drift` with `--calib` (greedy by gain per "
              "measured drift² increase, re-measured on the accumulated model; MP rank orders near-ties, or graph "
              f"order for *no MP prior*). *--gpu*: gain = modeled µs saved on {GPU}. The A100 speedup column is "
              "**modeled** (FP16 roofline at the shapes given, not measured) for every arm; *MACs* = fraction of "
              "eligible GEMM MACs made 2:4; *drift* = the pipeline's validation drift on the data named."), ""]
    for model in report["models"]:
        metrics = model["metrics"]
        dense = ", ".join(f"{m} {_fmt(m, model['dense'].get(m))}" for m in metrics)
        lines += [f"## {model['name']}", "", f"{model['description']}; speed modeled at {model['shapes']}; "
                  f"dense {dense}", "",
                  "| max drift | arm | " + " | ".join(metrics) + " | MACs 2:4 | layers | modeled A100 FP16 | drift "
                  "(validation) | s |", "|" + "---|" * (len(metrics) + 7)]
        for r in report["runs"]:
            if r["model"] != model["name"]:
                continue
            if "error" in r:
                lines.append(f"| {r['max_drift']:g} | {r['arm']} | error: {r['error']} |")
                continue
            speed = r["modeled_speedup_a100_fp16"]
            lines.append(f"| {r['max_drift']:g} | {r['arm']} | "
                         + " | ".join(_fmt(m, r["metrics"][m]) for m in metrics)
                         + f" | {100 * r['sparse_fraction_of_eligible']:.1f} % | {r['sparse_layers']} | "
                         f"{'—' if speed is None else f'{speed:.3f}×'} | {r['validation_relative_l2']:.4f} | "
                         f"{r['wall_s']:.0f} |")
        lines.append("")
    lines += ["## Notes", ""] + [f"- {n}" for n in report.get("notes", [])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits_vit at one budget (~1 min)")
    parser.add_argument("--models", nargs="*", choices=("digits_vit", "minilm"), help="subset (default: both)")
    parser.add_argument("-o", "--output", type=Path, help="JSON path (default benchmarks/results/layer_choice[_quick].json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from benchmarks.quality import digits_bench, minilm_bench

    budgets = QUICK_BUDGETS if args.quick else BUDGETS
    models = args.models or list(budgets)
    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    records = []
    stem = "layer_choice_quick" if args.quick else "layer_choice"
    out = args.output or RESULTS_DIR / f"{stem}.json"

    def save(complete: bool) -> dict[str, Any]:
        """Written after every run (a long run stopped early keeps what it measured, marked so)."""
        for model in records:
            model["verdicts"] = verdicts(model, runs)
        report = {**run_header("layer_choice", args.quick), "complete": complete, "gpu": GPU,
                  "arms": [asdict(a) for a in ARMS], "models": records, "runs": runs,
                  "errors": [f"{r['model']} / {r['arm']} / {r['max_drift']}: {r['error']}" for r in runs if "error" in r],
                  "notes": [] if complete else ["incomplete: the run was stopped before every arm ran"],
                  "seconds": round(time.perf_counter() - t0, 1)}
        save_results(report, out, markdown(report))
        return report

    with tempfile.TemporaryDirectory(prefix="mpc_layer_choice_") as tmp:
        folder = Path(tmp)
        for name in models:
            bench = minilm_bench(folder) if name == "minilm" else digits_bench(name, folder)
            print(f"== {bench.name}: {bench.description}", flush=True)
            records.append({"name": bench.name, "description": bench.description, "metrics": list(bench.metrics),
                            "primary_metric": bench.primary, "dense": bench.dense, "info": bench.info,
                            "budgets": list(budgets.get(name, BUDGETS[name][:1])),
                            "shapes": ", ".join(f"{k}={v}" for k, v in SHAPES[name].items())})
            for budget in budgets.get(name, BUDGETS[name][:1]):
                for arm in ARMS:
                    record = run_arm(bench, arm, budget, SHAPES[name], folder)
                    runs.append(record)
                    shown = record.get("metrics") or record.get("error")
                    print(f"  D={budget:<5g} {arm.label:<42} MACs {record.get('sparse_fraction_of_eligible', '?')!s:<7} "
                          f"A100 {record.get('modeled_speedup_a100_fp16') or 0:.3f}× (modeled) {shown} "
                          f"({record['wall_s']:.1f}s)", flush=True)
                    save(complete=False)
    report = save(complete=True)
    print(f"\nsaved {out} and {out.with_suffix('.md')} ({report['seconds']} s)")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
