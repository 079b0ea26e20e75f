"""Wall time and peak RSS of ``mpcompile analyze`` and of a full compile, with Polygraphy as the anchor.

Why this shape: DESIGN §5 sets the user-visible figures — a full compile of a ViT-B/16-sized
model ≤ 60 s on 2 cores and peak memory ≤ 2× model size + 0.5 GB — and names ``polygraphy
surgeon prune`` (magnitude 2:4, no analysis) as the anchor to beat. Every command runs in a
fresh process under the RSS wrapper of ``analyze_speed.py`` (peak RSS of that child only), on
the same generated file, in the same run, so the ratio shares the machine and its load.

Measured per model (ViT-B/16- and ResNet-50-shaped, synthetic weights, ``pixels`` fixed to
1×3×224×224 with ``--shape``):

- ``mpcompile -q analyze MODEL --shape … --json``
- ``mpcompile -q MODEL -o OUT --method magnitude --shape …`` (data-free full compile: analysis,
  permutation search on synthetic-input statistics, masks, write, independent check, ORT
  validation)
- ``mpcompile -q MODEL -o OUT --method cast --shape …`` (CAST on synthetic N(0,1) inputs)
- ``polygraphy surgeon prune MODEL -o OUT`` (needs ``onnx-graphsurgeon``)

When a full compile misses the time target it is run once more under cProfile and the functions
that take the time are reported (file:line(function), own and cumulative seconds); when it misses
the memory target it is run once more in-process with an RSS sampler, and the peak RSS of each
pipeline stage is reported.

Usage::

    python benchmarks/compile_speed.py            # ViT-B/16 + ResNet-50 (~8 min on 2 cores)
    python benchmarks/compile_speed.py --quick    # ViT-S/16 depth 4 + a 4-block ResNet (< 2 min)
    python benchmarks/compile_speed.py --models chain   # 300 chained 32×32 MatMuls: per-layer overhead

Writes ``benchmarks/results/compile_speed.json`` and ``compile_speed.md`` (``_quick`` with --quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.util
import json
import logging
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(HERE.parent))

from benchmarks.analyze_speed import (
    Measurement,
    _generator_hash,
    cached_vit,
    run_header,
    save_results,
    measure,
)
from benchmarks.model_generators import (
    RESNET50,
    VIT_B16,
    VIT_S16_DEPTH4,
    WORK_DIR,
    GeneratedModel,
    ResNetConfig,
    write_resnet,
)

logger = logging.getLogger("compile_speed")

RESULTS_DIR = HERE / "results"
TARGET_COMPILE_SECONDS = 60.0
TARGET_RSS_OVERHEAD_BYTES = 0.5e9  # "peak memory ≤ 2× model size + 0.5 GB"
RESNET_QUICK = ResNetConfig(blocks=(1, 1, 1, 1), width=32)
SHAPE = "pixels:1x3x224x224"
PROFILE_TOP = 20


def cached_resnet(config: ResNetConfig, seed: int = 0) -> tuple[GeneratedModel, bool]:
    """The ResNet for ``config``, regenerated only when its sidecar metadata does not match."""
    stem = f"resnet_w{config.width}_{'-'.join(map(str, config.blocks))}_seed{seed}"
    path, meta_path = WORK_DIR / f"{stem}.onnx", WORK_DIR / f"{stem}.json"
    wanted = {"config": dataclasses.asdict(config), "seed": seed, "generator": _generator_hash()}
    if path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == wanted and meta.get("file_bytes") == path.stat().st_size:
            return GeneratedModel(path, meta["parameters"], meta["gemm_layers"], 0,
                                  meta["weight_names"], meta["file_bytes"]), True
    model = write_resnet(path, config, seed=seed)
    meta_path.write_text(json.dumps({"key": wanted, "parameters": model.parameters,
                                     "gemm_layers": model.gemm_layers, "weight_names": model.weight_names,
                                     "file_bytes": model.file_bytes}))
    return model, False


CHAIN_LAYERS, CHAIN_LAYERS_QUICK, CHAIN_WIDTH = 300, 100, 32


def cached_chain(layers: int, width: int, seed: int = 0) -> tuple[GeneratedModel, bool]:
    """``layers`` chained ``width``×``width`` MatMuls (input ``x``: [1, width]).

    Why: the arithmetic of such a model is negligible, so its compile time is the pipeline's
    per-layer overhead (issue 15: 300 such layers did not compile within 60 s).
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path = WORK_DIR / f"chain_{layers}x{width}_seed{seed}.onnx"
    if path.exists():
        return GeneratedModel(path, layers * width * width, layers, 0, [f"w{i}" for i in range(layers)],
                              path.stat().st_size), True
    rng = np.random.default_rng(seed)
    nodes, weights, previous = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        weights.append(numpy_helper.from_array(w, f"w{i}"))
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [previous, f"w{i}"], [out], name=f"mm{i}"))
        previous = out
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], weights)
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return GeneratedModel(path, layers * width * width, layers, 0, [f"w{i}" for i in range(layers)],
                          path.stat().st_size), False


def commands(model: Path, out_dir: Path, polygraphy: str | None, shape: str = SHAPE) -> dict[str, list[str]]:
    """The measured command lines, keyed by a short name."""
    py = [sys.executable, "-m", "mpcompile", "-q"]
    cmds = {
        "analyze": [*py, "analyze", str(model), "--shape", shape, "--json"],
        "compile_magnitude": [*py, str(model), "-o", str(out_dir / "magnitude.onnx"), "--force", "--method", "magnitude",
                              "--shape", shape],
        "compile_cast": [*py, str(model), "-o", str(out_dir / "cast.onnx"), "--force", "--method", "cast",
                         "--shape", shape],
    }
    if polygraphy:
        cmds["polygraphy_prune"] = [polygraphy, "surgeon", "prune", str(model), "-o", str(out_dir / "polygraphy.onnx")]
    return cmds


def polygraphy_command() -> tuple[str | None, str | None]:
    """The polygraphy executable, or why the anchor cannot run (it needs onnx-graphsurgeon)."""
    exe = shutil.which("polygraphy")
    if exe is None:
        return None, "polygraphy is not installed (pip install polygraphy onnx-graphsurgeon)"
    if importlib.util.find_spec("onnx_graphsurgeon") is None:
        return None, "polygraphy surgeon needs onnx-graphsurgeon (pip install onnx-graphsurgeon)"
    return exe, None


def stage_seconds(report_path: Path) -> dict[str, float] | None:
    """``seconds`` per pipeline stage from the compile's own JSON report (OUT.report.json)."""
    candidates = [report_path, report_path.with_suffix(".report.json")]
    for path in candidates:
        if path.exists():
            return json.loads(path.read_text()).get("seconds")
    return None


def profile_compile(command: list[str], out: Path) -> dict[str, Any]:
    """Run a compile command under cProfile and return the functions that take the time."""
    prof = out / "compile.prof"
    argv = [sys.executable, "-m", "cProfile", "-o", str(prof), *command[1:]]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr[-500:]}"}
    stats = pstats.Stats(str(prof))
    root = str(HERE.parent)

    def rows(key: int) -> list[dict[str, Any]]:
        entries = sorted(stats.stats.items(), key=lambda item: item[1][key], reverse=True)[:PROFILE_TOP]
        out_rows = []
        for (filename, line, function), (_cc, calls, own, cumulative, _callers) in entries:
            name = filename.replace(root + "/", "") if filename.startswith(root) else filename
            out_rows.append({"where": f"{name}:{line}({function})", "calls": calls,
                             "own_s": round(own, 3), "cumulative_s": round(cumulative, 3)})
        return out_rows

    return {"command": " ".join(["python -m cProfile", *command[1:]]), "wall_s_under_profiler": round(wall, 2),
            "top_own_time": rows(2), "top_cumulative": rows(3)}


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def stage_memory_child(model: str, method: str) -> dict[str, Any]:
    """In this process: compile ``model`` while a thread samples RSS; peak RSS per pipeline stage.

    Why: peak RSS of the command says *whether* memory is over target, not *where*. Stage
    windows come from the pipeline's progress callbacks (MP fit, calibration, permutation,
    masks), the gaps between them are reported as such; the pipeline's own stage timings are
    returned beside them. The JSON/HTML report rendering of the CLI is not included.
    """
    import contextlib
    import threading

    from mpcompile.pipeline import CompileOptions, compile_model
    from mpcompile.io.shapes import ShapeSpec

    name, dims = SHAPE.split(":")
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter(), _rss_bytes()))
            time.sleep(0.02)

    marks: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def progress(description: str, _total: int):
        marks[description] = [time.perf_counter()]
        yield lambda _label: None
        marks[description].append(time.perf_counter())

    baseline = _rss_bytes()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    with tempfile.TemporaryDirectory(prefix="mpc_stage_mem_") as tmp:
        start = time.perf_counter()
        result = compile_model(model, CompileOptions(
            method=method, output=str(Path(tmp) / "out.onnx"), keep_dense=False,  # as the CLI
            shape_spec=ShapeSpec(inputs={name: tuple(int(d) for d in dims.split("x"))})), progress=progress)
        end = time.perf_counter()
    stop.set()
    thread.join()
    # Progress windows in time order; the gaps between them (load, dense reference, write,
    # check, validation) are labelled by the stages the pipeline times in them.
    spans = sorted(((v[0], v[1], k) for k, v in marks.items() if len(v) == 2))
    windows, t, previous = [], start, None
    for lo, hi, label in spans:
        if lo - t > 0.05:
            windows.append((f"before {label}" if previous is None else f"between {previous} and {label}", t, lo))
        windows.append((label, lo, hi))
        t, previous = hi, label
    windows.append((f"after {previous}" if previous else "whole compile", t, end))
    rows = []
    for label, lo, hi in windows:
        inside = [rss for when, rss in samples if lo <= when <= hi]
        rows.append({"stage": label, "seconds": round(hi - lo, 2),
                     "peak_rss_mb": round(max(inside) / 1e6, 1) if inside else None})
    return {"method": method, "rss_after_imports_mb": round(baseline / 1e6, 1),
            "peak_rss_mb": round(max(r for _, r in samples) / 1e6, 1), "compile_seconds": round(end - start, 1),
            "pipeline_seconds": result.seconds, "stages": rows}


def stage_memory(model: Path, method: str) -> dict[str, Any]:
    """Run :func:`stage_memory_child` in a fresh process (so earlier runs leave no memory behind)."""
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--stage-memory-child",
                           str(model), method], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr[-800:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _row(m: Measurement, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {**m.to_dict(), **(extra or {})}


def bench_model(name: str, model: GeneratedModel, cached: bool, args: argparse.Namespace,
                polygraphy: str | None, shape: str = SHAPE) -> dict[str, Any]:
    rss_target = 2 * model.file_bytes + TARGET_RSS_OVERHEAD_BYTES
    print(f"\n== {name}: {model.path.name} ({model.parameters / 1e6:.1f} M parameters, "
          f"{model.file_bytes / 1e6:.0f} MB, {model.gemm_layers} GEMM/Conv layers; "
          f"{'cached' if cached else 'generated'})", flush=True)
    record: dict[str, Any] = {"model": name, "path": str(model.path), "parameters": model.parameters,
                              "file_bytes": model.file_bytes, "gemm_layers": model.gemm_layers,
                              "shape": shape, "rss_target_bytes": int(rss_target), "runs": {}, "targets": {}}
    with tempfile.TemporaryDirectory(prefix="mpc_compile_speed_", dir=args.tmp) as tmp:
        out = Path(tmp)
        cmds = commands(model.path, out, polygraphy, shape)
        if args.skip_cast:
            cmds.pop("compile_cast")
        for key, cmd in cmds.items():
            shown = " ".join(["python" if c == sys.executable else c for c in cmd]).replace(str(out), "OUT")
            print(f"  {key:<18} {shown}", flush=True)
            try:
                m = measure(cmd)
            except (RuntimeError, subprocess.CalledProcessError) as exc:
                print(f"    FAILED: {exc}", flush=True)
                record["runs"][key] = {"command": shown, "error": str(exc)[-1500:]}
                continue
            extra: dict[str, Any] = {"command": shown}
            if key.startswith("compile"):
                extra["stage_seconds"] = stage_seconds(out / f"{key.split('_', 1)[1]}.report.json")
            record["runs"][key] = _row(m, extra)
            print(f"    {m.wall_s:.1f} s wall, {m.cpu_s:.1f} s cpu, {m.peak_rss_bytes / 1e6:.0f} MB peak RSS"
                  + (f"  stages {extra.get('stage_seconds')}" if extra.get("stage_seconds") else ""), flush=True)
            for f in out.glob("*.onnx*"):
                f.unlink()
        runs = record["runs"]
        anchor = runs.get("polygraphy_prune")
        for key in ("compile_magnitude", "compile_cast"):
            run = runs.get(key)
            if run is None or "error" in run:
                continue
            wall_ok = run["wall_s"] <= TARGET_COMPILE_SECONDS
            rss_ok = run["peak_rss_bytes"] <= rss_target
            target = {"wall_s": run["wall_s"], "wall_target_s": TARGET_COMPILE_SECONDS, "wall_pass": wall_ok,
                      "peak_rss_mb": run["peak_rss_mb"], "rss_target_mb": round(rss_target / 1e6, 1),
                      "rss_pass": rss_ok, "ms_per_layer": round(1000 * run["wall_s"] / model.gemm_layers, 1)}
            if anchor and "error" not in anchor:
                target["polygraphy_over_ours_wall"] = round(anchor["wall_s"] / run["wall_s"], 2)
                target["polygraphy_over_ours_rss"] = round(anchor["peak_rss_bytes"] / run["peak_rss_bytes"], 2)
            record["targets"][key] = target
            if not wall_ok and not args.no_profile and "profile" not in record:
                print(f"  {key} missed {TARGET_COMPILE_SECONDS:.0f} s: profiling it once under cProfile", flush=True)
                record["profile"] = {"of": key, **profile_compile(cmds[key], out)}
            if not rss_ok and not args.no_profile and "stage_memory" not in record:
                print(f"  {key} missed the memory target: peak RSS per pipeline stage", flush=True)
                record["stage_memory"] = {"of": key, **stage_memory(model.path, key.split("_", 1)[1])}
        if "analyze" in runs and "error" not in runs["analyze"]:
            a = runs["analyze"]
            record["targets"]["analyze"] = {"wall_s": a["wall_s"], "peak_rss_mb": a["peak_rss_mb"],
                                            "rss_pass": a["peak_rss_bytes"] <= rss_target}
            if anchor and "error" not in anchor:
                record["targets"]["analyze"]["polygraphy_over_ours_wall"] = round(anchor["wall_s"] / a["wall_s"], 2)
    return record


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Compile speed ({report['mode']})", "",
             (f"{report['date']} · {report['machine']['cpu_model']} · {report['machine']['cores_usable']} cores · "
             f"load {report['loadavg_at_end'][0]:.2f} at end · `{report['command']}` · "
             f"mpcompile {report['versions'].get('git_commit', '')}"), "",
             (f"Each command in a fresh process; peak RSS of that process. Targets (DESIGN §5): full compile "
             f"≤ {TARGET_COMPILE_SECONDS:.0f} s, peak RSS ≤ 2 × model file + 0.5 GB. Anchor: "
             f"`polygraphy surgeon prune` on the same file in the same run. Inputs fixed with `--shape {SHAPE}`."), ""]
    if report.get("polygraphy_unavailable"):
        lines += [f"Polygraphy anchor not run: {report['polygraphy_unavailable']}.", ""]
    lines += [("| model | command | wall s | cpu s | peak RSS MB | RSS target MB | polygraphy ÷ ours (wall) | "
              "meets targets? |"), "|---|---|---|---|---|---|---|---|"]
    for m in report["models"]:
        for key, run in m["runs"].items():
            if "error" in run:
                lines.append(f"| {m['model']} | `{key}` | ERROR: {run['error'][:80]} | | | | | |")
                continue
            t = m["targets"].get(key, {})
            if key.startswith("compile"):
                verdict = ("yes" if t.get("wall_pass") and t.get("rss_pass") else
                           "**no** (" + ", ".join(x for x, ok in (("time", t.get("wall_pass")),
                                                                  ("memory", t.get("rss_pass"))) if not ok) + ")")
            elif key == "analyze":
                verdict = "memory yes" if t.get("rss_pass") else "**memory no**"
            else:
                verdict = "anchor"
            ratio = t.get("polygraphy_over_ours_wall")
            lines.append(f"| {m['model']} ({m['file_bytes'] / 1e6:.0f} MB) | `{key}` | {run['wall_s']:.1f} | "
                         f"{run['cpu_s']:.1f} | {run['peak_rss_mb']:.0f} | {m['rss_target_bytes'] / 1e6:.0f} | "
                         f"{'' if ratio is None else f'{ratio:.2f}×'} | {verdict} |")
    lines.append("")
    for m in report["models"]:
        for key, run in m["runs"].items():
            if run.get("stage_seconds"):
                stages = ", ".join(f"{k} {v:.1f}" for k, v in run["stage_seconds"].items())
                per_layer = m["targets"].get(key, {}).get("ms_per_layer")
                lines.append(f"- {m['model']} `{key}` stages (s, from its report): {stages}"
                             + (f"; {per_layer} ms per layer ({m['gemm_layers']} layers, wall)" if per_layer else ""))
    lines.append("")
    for m in report["models"]:
        mem = m.get("stage_memory")
        if not mem:
            continue
        lines += [f"## Peak RSS per stage: {m['model']} `{mem['of']}` (in-process, report rendering excluded)", ""]
        if "error" in mem:
            lines += [f"failed: {mem['error']}", ""]
            continue
        lines += [(f"RSS after imports {mem['rss_after_imports_mb']:.0f} MB; peak {mem['peak_rss_mb']:.0f} MB; "
                  f"model file {m['file_bytes'] / 1e6:.0f} MB; target {m['rss_target_bytes'] / 1e6:.0f} MB."), "",
                  "| stage | seconds | peak RSS MB |", "|---|---|---|"]
        lines += [f"| {r['stage']} | {r['seconds']} | {r['peak_rss_mb']} |" for r in mem["stages"]]
        lines.append("")
    for m in report["models"]:
        prof = m.get("profile")
        if not prof:
            continue
        lines += [f"## Profile: {m['model']} `{prof['of']}`", ""]
        if "error" in prof:
            lines += [f"profiling failed: {prof['error']}", ""]
            continue
        lines += [f"`{prof['command']}` ({prof['wall_s_under_profiler']} s under the profiler)", "",
                  "| function (own time) | calls | own s | cumulative s |", "|---|---|---|---|"]
        lines += [f"| `{r['where']}` | {r['calls']} | {r['own_s']} | {r['cumulative_s']} |"
                  for r in prof["top_own_time"][:12]]
        lines += ["", "| function (cumulative) | calls | own s | cumulative s |", "|---|---|---|---|"]
        lines += [f"| `{r['where']}` | {r['calls']} | {r['own_s']} | {r['cumulative_s']} |"
                  for r in prof["top_cumulative"][:15]]
        lines.append("")
    return "\n".join(lines)


def diagnose_only(path: Path) -> int:
    """Add the diagnostics a saved run lacks, without re-timing anything."""
    if not path.exists():
        print(f"--diagnose-only: no saved results at {path}; run without it first", file=sys.stderr)
        return 2
    report = json.loads(path.read_text())
    for record in report["models"]:
        model = Path(record["path"])
        for key, target in record["targets"].items():
            if not key.startswith("compile"):
                continue
            if not target["wall_pass"] and "profile" not in record:
                with tempfile.TemporaryDirectory(prefix="mpc_compile_speed_") as tmp:
                    print(f"{record['model']} {key}: cProfile", flush=True)
                    record["profile"] = {"of": key, **profile_compile(commands(model, Path(tmp), None)[key], Path(tmp))}
            if not target["rss_pass"] and "stage_memory" not in record:
                print(f"{record['model']} {key}: peak RSS per stage", flush=True)
                record["stage_memory"] = {"of": key, **stage_memory(model, key.split("_", 1)[1])}
    report["diagnostics_added"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    text = markdown(report)
    save_results(report, path, text)
    print("\n" + text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ViT-S/16 depth 4 + a 4-block ResNet (< 2 min)")
    parser.add_argument("--models", nargs="*", choices=("vit", "resnet", "chain"), default=["vit", "resnet", "chain"],
                        help="chain: 300 chained 32x32 MatMuls (per-layer overhead; 100 with --quick)")
    parser.add_argument("--skip-cast", action="store_true", help="only the data-free magnitude compile")
    parser.add_argument("--no-profile", action="store_true", help="never re-run a slow compile under cProfile")
    parser.add_argument("--tmp", type=Path, default=None, help="folder for the written models (default: system tmp)")
    parser.add_argument("-o", "--output", type=Path,
                        help="JSON path (default benchmarks/results/compile_speed[_quick].json)")
    parser.add_argument("--diagnose-only", action="store_true",
                        help="re-read the saved JSON and add only the missing cProfile / per-stage memory "
                             "diagnostics of compiles that missed a target (no timing runs)")
    parser.add_argument("--stage-memory-child", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.stage_memory_child:
        print(json.dumps(stage_memory_child(*args.stage_memory_child)))
        return 0
    stem = "compile_speed_quick" if args.quick else "compile_speed"
    out = args.output or RESULTS_DIR / f"{stem}.json"
    if args.diagnose_only:
        return diagnose_only(out)
    polygraphy, why_not = polygraphy_command()
    if why_not:
        print(f"anchor skipped: {why_not}")
    t0 = time.perf_counter()
    records = []
    for name in args.models:
        if name == "vit":
            config = VIT_S16_DEPTH4 if args.quick else VIT_B16
            model, cached = cached_vit(config, 0, 16)
            label = "ViT-S/16 depth 4" if args.quick else "ViT-B/16"
        elif name == "chain":
            layers = CHAIN_LAYERS_QUICK if args.quick else CHAIN_LAYERS
            model, cached = cached_chain(layers, CHAIN_WIDTH)
            label = f"chain of {layers} {CHAIN_WIDTH}x{CHAIN_WIDTH} MatMuls"
            records.append(bench_model(label, model, cached, args, None, shape=f"x:1x{CHAIN_WIDTH}"))
            continue
        else:
            config = RESNET_QUICK if args.quick else RESNET50
            model, cached = cached_resnet(config)
            label = "ResNet (4 blocks, width 32)" if args.quick else "ResNet-50"
        records.append(bench_model(label, model, cached, args, polygraphy))
    compile_targets = [t for r in records for k, t in r["targets"].items() if k.startswith("compile")]
    report = {
        **run_header("compile_speed", args.quick),
        "polygraphy_unavailable": why_not,
        "models": records,
        "all_compile_targets_pass": bool(compile_targets) and all(
            t["wall_pass"] and t["rss_pass"] for t in compile_targets),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    text = markdown(report)
    save_results(report, out, text)
    print("\n" + text)
    print(f"saved {out} and {out.with_suffix('.md')} ({report['seconds']} s)")
    errors = [k for r in records for k, run in r["runs"].items() if "error" in run]
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
