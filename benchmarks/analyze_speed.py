"""Speed and peak memory of ``mpcompile analyze`` against a plain full-SVD MP fit (DESIGN §5).

Why this shape: the figures that matter to a user are the wall time and peak RSS of the
*command*, so each measurement runs in a fresh process and its peak RSS is read from
``getrusage(RUSAGE_CHILDREN)`` of a tiny wrapper that started nothing else. The anchor — the
papers' full-SVD + quad/brentq fit (``_reference_mp_fit.py``) — runs on the same synthetic
ViT-B/16 in the same run, so the comparison shares the machine and its load.

Usage::

    python benchmarks/analyze_speed.py            # ViT-B/16, ~86.6 M parameters (full)
    python benchmarks/analyze_speed.py --quick    # ViT-S/16 depth 4 (< 1 minute)

Writes ``benchmarks/results/analyze_speed.json`` (``analyze_speed_quick.json`` with --quick).
Models are generated once into the git-ignored ``benchmarks/_work/`` and reused when the
sidecar metadata (config, seed, planted rank, generator source hash) still matches.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(HERE.parent))

from benchmarks import _reference_mp_fit as reference  # noqa: E402
from benchmarks.model_generators import (  # noqa: E402
    VIT_B16,
    VIT_S16_DEPTH4,
    WORK_DIR,
    GeneratedModel,
    ViTConfig,
    write_vit,
)

TARGET_MISSED_EXIT = 10  # ran fine, a speed/memory target was missed (not a failure)

logger = logging.getLogger(__name__)

RESULTS_DIR = HERE / "results"
TARGET_SECONDS = 20.0
TARGET_RSS_OVERHEAD_BYTES = 0.5e9  # "peak memory ≤ 2× model size + 0.5 GB"
ANCHOR_DESIGN_SECONDS = 30.0
SIGMA2_TOLERANCE = 1e-3
_BLAS_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

# Runs argv[2:] with stdout to argv[1]; prints wall time, peak RSS and CPU time of that child only.
_MEASURE = r"""
import json, resource, subprocess, sys, time
with open(sys.argv[1], "wb") as out, open(sys.argv[1] + ".err", "wb") as err:
    t = time.perf_counter()
    rc = subprocess.run(sys.argv[2:], stdout=out, stderr=err).returncode
    wall = time.perf_counter() - t
u = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": rc, "wall_s": wall, "maxrss_kb": u.ru_maxrss,
                  "cpu_s": u.ru_utime + u.ru_stime}))
"""


@dataclasses.dataclass
class Measurement:
    """One command run in a fresh process."""

    wall_s: float
    peak_rss_bytes: int
    cpu_s: float
    load_before: float
    stdout: str

    def to_dict(self) -> dict[str, Any]:
        return {"wall_s": round(self.wall_s, 3), "peak_rss_bytes": self.peak_rss_bytes,
                "peak_rss_mb": round(self.peak_rss_bytes / 1e6, 1), "cpu_s": round(self.cpu_s, 3),
                "loadavg_1min_before": self.load_before}


def measure(command: list[str], env: dict[str, str] | None = None) -> Measurement:
    """Run ``command`` under the RSS wrapper; raise with its stderr if it fails."""
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="mpc_bench_") as tmp:
        out = Path(tmp) / "stdout"
        wrapper = subprocess.run([sys.executable, "-c", _MEASURE, str(out), *command],
                                 capture_output=True, text=True, check=True, env=env)
        stats = json.loads(wrapper.stdout)
        stdout = out.read_text()
        if stats["rc"] != 0:
            err = Path(str(out) + ".err").read_text()[-2000:]
            raise RuntimeError(f"{' '.join(command)} exited with {stats['rc']}:\n{err}")
    return Measurement(stats["wall_s"], int(stats["maxrss_kb"]) * 1024, stats["cpu_s"], load, stdout)


# ----------------------------------------------------------------------- model cache


def _generator_hash() -> str:
    return hashlib.sha256((HERE / "model_generators.py").read_bytes()).hexdigest()[:16]


def cached_vit(config: ViTConfig, seed: int, planted_rank: int) -> tuple[GeneratedModel, bool]:
    """The model for ``config``, regenerated only when its sidecar metadata does not match."""
    stem = f"vit_d{config.dim}_l{config.depth}_h{config.heads}_seed{seed}_r{planted_rank}"
    path, meta_path = WORK_DIR / f"{stem}.onnx", WORK_DIR / f"{stem}.json"
    wanted = {"config": dataclasses.asdict(config), "seed": seed, "planted_rank": planted_rank,
              "generator": _generator_hash()}
    if path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == wanted and meta.get("file_bytes") == path.stat().st_size:
            return GeneratedModel(path, meta["parameters"], meta["gemm_layers"], planted_rank,
                                  meta["weight_names"], meta["file_bytes"]), True
    model = write_vit(path, config, seed=seed, planted_rank=planted_rank)
    meta_path.write_text(json.dumps({
        "key": wanted, "parameters": model.parameters, "gemm_layers": model.gemm_layers,
        "weight_names": model.weight_names, "file_bytes": model.file_bytes,
    }))
    return model, False


def validate_model(path: Path, config: ViTConfig) -> dict[str, Any]:
    """onnx.checker + one batch-1 onnxruntime run: the generated graph must be a real model."""
    import onnx
    import onnxruntime as ort

    start = time.perf_counter()
    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(0).standard_normal(
        (1, config.channels, config.image, config.image)).astype(np.float32)
    logits = session.run(None, {"pixels": pixels})[0]
    del session
    return {"onnx_checker": "passed", "onnxruntime_output_shape": list(logits.shape),
            "onnxruntime_output_finite": bool(np.isfinite(logits).all()),
            "seconds": round(time.perf_counter() - start, 2)}


# ----------------------------------------------------------------------- environment


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = None
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu_model": cpu,
            "cores_logical": os.cpu_count(), "cores_usable": cores,
            "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "ram_bytes": ram,
            "ram_gb": round(ram / 1e9, 1) if ram else None,
            "blas_threads_env": {k: os.environ[k] for k in _BLAS_ENV if k in os.environ}}


def run_header(benchmark: str, quick: bool) -> dict[str, Any]:
    """The fields every benchmark's JSON starts with: what ran, when, where, with what."""
    return {
        "benchmark": benchmark,
        "mode": "quick" if quick else "full",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "loadavg_at_end": list(os.getloadavg()),
        "versions": versions(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def save_results(report: dict[str, Any], out: Path, markdown: str | None = None) -> None:
    """Write ``report`` as JSON at ``out`` (and ``markdown`` beside it as ``.md``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if markdown is not None:
        out.with_suffix(".md").write_text(markdown + "\n")


def versions() -> dict[str, str]:
    import onnx
    import onnx_ir
    import onnxruntime
    import scipy

    import mpcompile

    out = {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
           "onnx": onnx.__version__, "onnx_ir": onnx_ir.__version__,
           "onnxruntime": onnxruntime.__version__, "mpcompile": mpcompile.__version__}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, check=True).stdout.strip()
        out["git_commit"] = commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


# ----------------------------------------------------------------------- comparison


def compare_sigma2(
    ours: dict[str, Any], anchor: dict[str, Any], spectra: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Per-layer relative σ² differences, by weight name.

    ``reference_levels``: ours vs the anchor as written (levels k/p). ``midpoint_levels``:
    ours vs the same quad/brentq quantiles at mpcompile's levels (k+½)/p on the anchor's
    singular values — isolates the accuracy of the tabulated quantiles from the convention.
    """
    by_weight = {layer["weight"]: layer for layer in ours["layers"] if layer.get("mp")}
    rows, ref_diffs, mid_diffs = [], [], []
    for layer in anchor["layers"]:
        mine = by_weight.get(layer["weight"])
        if mine is None:
            continue
        s2_ours = mine["mp"]["sigma2"]
        mid = reference.bema_sigma2(spectra[layer["weight"]], layer["rows"], layer["cols"],
                                    midpoint=True)
        ref_diff = abs(layer["sigma2"] - s2_ours) / s2_ours
        mid_diff = abs(mid - s2_ours) / s2_ours
        ref_diffs.append(ref_diff)
        mid_diffs.append(mid_diff)
        rows.append({"weight": layer["weight"], "shape": [layer["rows"], layer["cols"]],
                     "sigma2_ours": s2_ours, "sigma2_anchor": layer["sigma2"],
                     "rel_diff": ref_diff, "rel_diff_midpoint_levels": mid_diff,
                     "spikes_ours_tw99": mine["mp"]["spikes"],
                     "spikes_anchor_plain_edge": layer["spikes"]})
    if not rows:
        raise RuntimeError("no layer of the anchor matched a layer of mpcompile's report")
    return {"matched_layers": len(rows),
            "max_rel_diff": max(ref_diffs), "median_rel_diff": statistics.median(ref_diffs),
            "max_rel_diff_midpoint_levels": max(mid_diffs),
            "median_rel_diff_midpoint_levels": statistics.median(mid_diffs),
            "per_layer": rows}


# ----------------------------------------------------------------------- main


def _print_run(m: Measurement) -> None:
    print(f"    {m.wall_s:.2f}s wall, {m.cpu_s:.2f}s cpu, {m.peak_rss_bytes / 1e6:.0f} MB peak RSS",
          flush=True)


def _median_run(runs: list[Measurement]) -> Measurement:
    """Median wall time; peak RSS is the worst over runs (memory limits are hard limits)."""
    ordered = sorted(runs, key=lambda m: m.wall_s)
    mid = ordered[len(ordered) // 2]
    return dataclasses.replace(mid, peak_rss_bytes=max(m.peak_rss_bytes for m in runs))


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = VIT_S16_DEPTH4 if args.quick else VIT_B16
    t0 = time.perf_counter()
    model, cached = cached_vit(config, args.seed, args.planted_rank)
    gen_s = time.perf_counter() - t0
    origin = "cached" if cached else f"generated in {gen_s:.1f}s"
    print(f"model: {model.path} ({model.parameters / 1e6:.1f} M parameters, "
          f"{model.file_bytes / 1e6:.1f} MB, {model.gemm_layers} GEMM/Conv layers; {origin})")
    checks = None if args.skip_checks else validate_model(model.path, config)

    env = None
    if args.blas_threads:
        env = {**os.environ, **{k: str(args.blas_threads) for k in _BLAS_ENV}}
    ours_cmd = [sys.executable, "-m", "mpcompile", "-q", "analyze", str(model.path), "--json"]
    with tempfile.TemporaryDirectory(prefix="mpc_bench_") as tmp:
        sv_path = Path(tmp) / "singular_values.npz"
        anchor_cmd = [sys.executable, str(HERE / "_reference_mp_fit.py"), str(model.path),
                      "--singular-values", str(sv_path)]
        ours_runs, anchor_runs = [], []
        for i in range(args.repeat):
            print(f"[{i + 1}/{args.repeat}] ours:   {' '.join(ours_cmd[1:])}", flush=True)
            ours_runs.append(measure(ours_cmd, env))
            _print_run(ours_runs[-1])
            if not args.skip_anchor:
                print(f"[{i + 1}/{args.repeat}] anchor: {' '.join(anchor_cmd[1:3])}", flush=True)
                anchor_runs.append(measure(anchor_cmd, env))
                _print_run(anchor_runs[-1])
        ours = _median_run(ours_runs)
        report = json.loads(ours.stdout)
        anchor = _median_run(anchor_runs) if anchor_runs else None
        comparison = None
        anchor_report = None
        if anchor is not None:
            anchor_report = json.loads(anchor.stdout)
            with np.load(sv_path) as npz:
                spectra = {k: npz[k] for k in npz.files}
            comparison = compare_sigma2(report, anchor_report, spectra)

    layers = report["layers"]
    total_spikes = sum(layer["mp"]["spikes"] for layer in layers if layer.get("mp"))
    rss_target = 2 * model.file_bytes + TARGET_RSS_OVERHEAD_BYTES
    planted = model.gemm_layers * model.planted_rank
    targets: dict[str, Any] = {
        "ours_peak_rss": {"target_bytes": int(rss_target), "value_bytes": ours.peak_rss_bytes,
                          "rule": "≤ 2 × model file size + 0.5 GB",
                          "pass": ours.peak_rss_bytes <= rss_target},
        "planted_spikes_found": {"target": planted, "value": total_spikes,
                                 "pass": total_spikes == planted},
    }
    if not args.quick:
        targets["ours_wall"] = {"target_s": TARGET_SECONDS, "value_s": round(ours.wall_s, 3),
                                "rule": "≤ 20 s on 2 cores (ViT-B/16)",
                                "pass": ours.wall_s <= TARGET_SECONDS}
    if anchor is not None:
        targets["beats_anchor_wall"] = {"anchor_s": round(anchor.wall_s, 3),
                                        "ours_s": round(ours.wall_s, 3),
                                        "speedup": round(anchor.wall_s / ours.wall_s, 2),
                                        "pass": ours.wall_s < anchor.wall_s}
        targets["sigma2_agreement"] = {
            "tolerance": SIGMA2_TOLERANCE,
            "max_rel_diff_midpoint_levels": comparison["max_rel_diff_midpoint_levels"],
            "max_rel_diff_reference_levels": comparison["max_rel_diff"],
            "rule": "same quantile levels (k+½)/p: |σ²_ours − σ²_anchor| / σ²_ours ≤ tol",
            "pass": comparison["max_rel_diff_midpoint_levels"] <= SIGMA2_TOLERANCE,
        }

    return {
        **run_header("analyze_speed", args.quick),
        "model": {"path": str(model.path), "shape": dataclasses.asdict(config), "seed": args.seed,
                  "planted_rank": model.planted_rank, "parameters": model.parameters,
                  "file_bytes": model.file_bytes, "gemm_layers": model.gemm_layers, "cached": cached,
                  "generation_seconds": None if cached else round(gen_s, 2), "checks": checks},
        "repeats": args.repeat,
        "blas_threads": args.blas_threads or "default (inherited environment)",
        "ours": {"command": " ".join(["python", *ours_cmd[1:]]), **ours.to_dict(),
                 "runs_wall_s": [round(m.wall_s, 3) for m in ours_runs],
                 "analysis_seconds_inside": report["summary"].get("seconds"),
                 "layers": len(layers), "unique_weights": report["summary"].get("unique_weights"),
                 "total_spikes": total_spikes},
        "anchor": None if anchor is None else {
            "command": " ".join(["python", *anchor_cmd[1:3]]), **anchor.to_dict(),
            "runs_wall_s": [round(m.wall_s, 3) for m in anchor_runs],
            "load_seconds_inside": round(anchor_report["load_seconds"], 3),
            "fit_seconds_inside": round(anchor_report["fit_seconds"], 3),
            "layers": len(anchor_report["layers"]),
            "total_spikes_plain_edge": sum(layer["spikes"] for layer in anchor_report["layers"]),
            "design_reference_s": ANCHOR_DESIGN_SECONDS},
        "sigma2_comparison": comparison,
        "targets": targets,
        "all_targets_pass": all(t["pass"] for t in targets.values()),
    }


def print_table(result: dict[str, Any]) -> None:
    ours, anchor, model = result["ours"], result["anchor"], result["model"]
    print()
    print(f"analyze_speed ({result['mode']}): {model['parameters'] / 1e6:.1f} M params, "
          f"{model['file_bytes'] / 1e6:.1f} MB, {model['gemm_layers']} GEMM/Conv layers; "
          f"{result['machine']['cpu_model']}, {result['machine']['cores_usable']} cores; "
          f"load {result['loadavg_at_end'][0]:.2f}")
    header = f"{'':<26}{'wall s':>9}{'cpu s':>9}{'peak RSS MB':>13}{'layers':>8}{'spikes':>8}"
    print(header)
    print("-" * len(header))
    print(f"{'mpcompile analyze':<26}{ours['wall_s']:>9.2f}{ours['cpu_s']:>9.2f}"
          f"{ours['peak_rss_mb']:>13.0f}{ours['layers']:>8}{ours['total_spikes']:>8}")
    if anchor:
        print(f"{'anchor: full SVD + brentq':<26}{anchor['wall_s']:>9.2f}{anchor['cpu_s']:>9.2f}"
              f"{anchor['peak_rss_mb']:>13.0f}{anchor['layers']:>8}"
              f"{anchor['total_spikes_plain_edge']:>8}")
        cmp_ = result["sigma2_comparison"]
        print(f"σ² max rel diff vs anchor: {cmp_['max_rel_diff']:.2e} (reference levels k/p), "
              f"{cmp_['max_rel_diff_midpoint_levels']:.2e} (same levels (k+½)/p)")
    print()
    for name, target in result["targets"].items():
        shown = {k: v for k, v in target.items() if k != "pass"}
        print(f"{'PASS' if target['pass'] else 'FAIL'}  {name}: {shown}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="ViT-S/16 depth 4 instead of ViT-B/16 (< 1 min)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--planted-rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=1, help="runs per command (median wall, max RSS)")
    parser.add_argument("--blas-threads", type=int, metavar="N",
                        help="set OMP/OPENBLAS/MKL_NUM_THREADS=N for both measured commands")
    parser.add_argument("--skip-anchor", action="store_true", help="measure mpcompile only")
    parser.add_argument("--skip-checks", action="store_true",
                        help="skip onnx.checker + onnxruntime on the model")
    parser.add_argument("-o", "--output", type=Path,
                        help="JSON path (default benchmarks/results/analyze_speed[_quick].json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(args)
    print_table(result)
    name = "analyze_speed_quick.json" if args.quick else "analyze_speed.json"
    out = args.output or RESULTS_DIR / name
    save_results(result, out)
    print(f"\nsaved {out}")
    return 0 if result["all_targets_pass"] else TARGET_MISSED_EXIT


if __name__ == "__main__":
    raise SystemExit(main())
