"""Conformance: real architectures, both exporters, end to end (issue 11 part 6).

For each model of :data:`benchmarks.conformance_models.CASES` and each exporter: discovery
finds every constant-weight GEMM/Conv (counted independently from the protobuf, subgraphs
included), ``mpcompile`` compile exits 0 without a traceback, ``mpcompile check`` passes, and
random channel permutations folded into every foldable layer leave the dense outputs
unchanged (relative 1e-5) before any pruning. An exporter that fails is recorded as such:
that is the exporter's limit, not ours.

``python benchmarks/conformance.py [--quick]`` writes ``benchmarks/results/conformance[_quick].json``
and ``.md``; ``tests/test_conformance.py`` runs the quick subset in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from benchmarks.conformance_models import CASES, ModelCase, export_case  # noqa: E402

__all__ = ["CaseResult", "count_constant_gemms", "fold_error", "run_case"]

FOLD_TOLERANCE = 1e-5  # max |Δ| over max |dense output|: float32 reassociation only
_GEMM_OPS = {"MatMul", "Gemm", "Conv"}
# Ops that keep a constant constant (values, possibly reshaped/reordered): a weight read
# through them is still a constant weight, whatever discovery makes of it.
_CONST_PRESERVING = {"Identity", "Cast", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
                     "DequantizeLinear"}


def count_constant_gemms(proto: onnx.ModelProto) -> dict[str, int]:
    """MatMul/Gemm/Conv nodes whose weight (input 1) is a constant, by graph (``main`` or the
    subgraph's path), read from the protobuf alone: an independent count to hold discovery to.
    """
    counts: dict[str, int] = {}

    def walk(graph: onnx.GraphProto, where: str, outer: set[str]) -> None:
        constant = set(outer) | {t.name for t in graph.initializer} | {t.name for t in graph.sparse_initializer}
        for node in graph.node:  # nodes are topologically sorted: producers come first
            if node.op_type == "Constant":
                constant.update(node.output)
            elif node.op_type in _CONST_PRESERVING and node.input and all(
                    i in constant for i in node.input if i):
                constant.update(node.output)
        for node in graph.node:
            if node.op_type in _GEMM_OPS and node.domain in ("", "ai.onnx") and len(node.input) > 1 \
                    and node.input[1] in constant:
                counts[where] = counts.get(where, 0) + 1
            for attr in node.attribute:
                subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for i, sub in enumerate(subgraphs):
                    walk(sub, f"{where}/{node.name or node.op_type}.{attr.name}{i or ''}", constant)

    walk(proto.graph, "main", set())
    return counts


def fold_error(path: Path, seed: int = 1) -> tuple[int, float]:
    """Fold a random permutation into every foldable layer; (folded count, relative max |Δ|).

    Compared: the graph outputs and the output of every fold consumer that is not itself a
    permuted producer (a consumer's output is invariant under the fold). Why the consumers too:
    some random-weight models have a degenerate output (torchvision's ViT zero-initialises its
    head, so every logit is 0 and the graph outputs alone would report a perfect 0.0).
    """
    from mpcompile.io.calibration import ModelRunner, synthetic_inputs
    from mpcompile.io.model_io import load_model
    from mpcompile.passes.gemm_discovery import discover_gemms
    from mpcompile.passes.permute_channels import apply_fold, plan_fold
    from mpcompile.io.shapes import ShapeSpec

    model = load_model(path).model
    data = synthetic_inputs(model, ShapeSpec(), samples=2, seed=seed)
    watched = [layer.node.outputs[0] for layer in discover_gemms(model) if layer.node.graph is model.graph]

    def run() -> dict[str, np.ndarray]:  # one sample at a time: exports stuck at batch 1 run too
        runner = ModelRunner(model, watched)
        names = runner.output_names
        parts = [runner.run(data.slice(i, i + 1)) for i in range(data.samples)]
        return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(names)}

    reference = run()
    rng = np.random.default_rng(seed)
    consumers: set[str] = set()
    producers: set[str] = set()
    folded = 0
    for node in [layer.node for layer in discover_gemms(model)]:
        layers = discover_gemms(model)
        layer = next(item for item in layers if item.node is node)
        plan = plan_fold(model, layer, layers)
        if plan.foldable:
            apply_fold(model, plan, rng.permutation(layer.in_channels))
            folded += 1
            consumers.update(c.node.outputs[0].name for c in plan.consumers)
            producers.add(plan.producer.outputs[0].name)
    after = run()
    compared = [n for n in reference if n in consumers - producers or n in {v.name for v in model.graph.outputs}]
    scale = max(float(np.abs(reference[n]).max()) for n in compared if reference[n].size) or 1.0
    error = max(float(np.abs(after[n].astype(np.float64) - reference[n]).max()) for n in compared
                if reference[n].size)
    return folded, error / max(scale, 1.0)


@dataclass
class CaseResult:
    """One model × exporter. ``status``: ok | failed | exporter failed: REASON."""

    model: str
    exporter: str
    status: str = "ok"
    expected_layers: int = 0
    found_layers: int = 0
    subgraph_layers: int = 0
    compile_exit: int | None = None
    check_exit: int | None = None
    traceback: bool = False
    folded: int = 0
    fold_error: float | None = None
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def found_fraction(self) -> float | None:
        return self.found_layers / self.expected_layers if self.expected_layers else None


def _mpcompile(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.run([sys.executable, "-m", "mpcompile", "-q", *args], capture_output=True, text=True,
                          env=env, check=False, timeout=1800)


def run_case(case: ModelCase, dynamo: bool, work: Path) -> CaseResult:
    from mpcompile.io.model_io import load_model
    from mpcompile.passes.gemm_discovery import discover_gemms

    result = CaseResult(case.name, "dynamo" if dynamo else "legacy")
    start = time.perf_counter()
    path = work / f"{case.name}_{result.exporter}.onnx"
    try:
        export_case(case, path, dynamo=dynamo)
    except Exception as exc:  # the exporter's failure, recorded, not ours
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        result.status = f"exporter failed: {type(exc).__name__}: {first[:160]}"
        result.seconds = round(time.perf_counter() - start, 1)
        return result
    counts = count_constant_gemms(onnx.load(str(path), load_external_data=False))
    result.expected_layers = sum(counts.values())
    result.subgraph_layers = result.expected_layers - counts.get("main", 0)
    try:
        result.found_layers = len(discover_gemms(load_model(path).model))
        result.folded, result.fold_error = fold_error(path)
    except Exception:
        result.traceback = True
        result.problems.append("in-process stage raised: " + traceback.format_exc().strip().splitlines()[-1])
    out = work / f"{path.stem}.sparse.onnx"
    compiled = _mpcompile(str(path), "-o", str(out))
    result.compile_exit = compiled.returncode
    result.traceback |= "Traceback" in compiled.stderr
    if compiled.returncode != 0:
        result.problems.append("compile: " + (compiled.stderr.strip().splitlines() or ["?"])[-1][:200])
    else:
        checked = _mpcompile("check", str(out))
        result.check_exit = checked.returncode
        result.traceback |= "Traceback" in checked.stderr
        if checked.returncode != 0:
            result.problems.append("check: " + (checked.stderr.strip().splitlines() or ["?"])[-1][:200])
    if result.found_layers != result.expected_layers:
        result.problems.append(f"discovery found {result.found_layers} of {result.expected_layers} "
                               f"constant-weight GEMM/Conv ({result.subgraph_layers} in subgraphs)")
    if result.fold_error is not None and result.fold_error > FOLD_TOLERANCE:
        result.problems.append(f"folded permutations changed the outputs by {result.fold_error:.2e} (relative)")
    if result.problems or result.compile_exit != 0 or result.check_exit != 0 or result.traceback:
        result.status = "failed"
    result.seconds = round(time.perf_counter() - start, 1)
    return result


def _markdown(results: list[CaseResult], quick: bool, only: list[str] | None = None) -> str:
    subset = " (quick subset)" if quick else f" (only {', '.join(only)})" if only else ""
    lines = [f"# Conformance{subset}", "",
             "Random-weight models exported here; found = discovered / independently counted constant-weight "
             "GEMM/Conv; fold error = max |Δ| / max(1, max |output|) over the graph outputs and every fold "
             "consumer's output, after random permutations folded into every foldable layer (before pruning).", "",
             f"Last updated {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores by "
             f"`{' '.join(['python benchmarks/conformance.py', *sys.argv[1:]])}`.", "",
             "| model | exporter | status | found | compile | check | folded | fold error | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.status.startswith("exporter failed"):
            lines.append(f"| {r.model} | {r.exporter} | {r.status} | | | | | | {r.seconds} |")
            continue
        found = f"{r.found_layers}/{r.expected_layers}"
        err = "" if r.fold_error is None else f"{r.fold_error:.1e}"
        status = r.status + ("" if not r.problems else ": " + "; ".join(r.problems))
        lines.append(f"| {r.model} | {r.exporter} | {status} | {found} | {r.compile_exit} | "
                     f"{'' if r.check_exit is None else r.check_exit} | {r.folded} | {err} | {r.seconds} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small CI subset only")
    parser.add_argument("--only", nargs="+", help="model names")
    parser.add_argument("--exporter", choices=("legacy", "dynamo"), help="one exporter only")
    parser.add_argument("--merge", action="store_true",
                        help="replace these cases' rows in the saved results instead of overwriting them")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    cases = [c for c in CASES if (c.quick or not args.quick) and (not args.only or c.name in args.only)]
    results = []
    with tempfile.TemporaryDirectory(prefix="mpcompile-conformance-") as tmp:
        for case in cases:
            for dynamo in (False, True):
                exporter = "dynamo" if dynamo else "legacy"
                if (args.quick and exporter not in case.quick) or (args.exporter and exporter != args.exporter):
                    continue
                r = run_case(case, dynamo, Path(tmp))
                print(f"{r.model:<22} {r.exporter:<7} {r.status[:90]} found {r.found_layers}/{r.expected_layers} "
                      f"{' '.join(r.problems)[:200]} ({r.seconds}s)", flush=True)
                results.append(r)
                for f in Path(tmp).glob("*"):
                    f.unlink()
    name = "conformance_quick" if args.quick else "conformance"
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    payload = {"quick": args.quick, "only": args.only, "cases": [dict(asdict(r), found_fraction=r.found_fraction) for r in results]}
    saved = out / f"{name}.json"
    if args.merge and saved.exists():
        previous = json.loads(saved.read_text())
        fresh = {(r.model, r.exporter): r for r in results}
        kept = [CaseResult(**{k: v for k, v in c.items() if k != "found_fraction"}) for c in previous["cases"]]
        results = [fresh.pop((r.model, r.exporter), r) for r in kept] + list(fresh.values())
        payload = {"quick": args.quick, "only": previous.get("only"),
                   "cases": [dict(asdict(r), found_fraction=r.found_fraction) for r in results]}
        args.only = previous.get("only")
    saved.write_text(json.dumps(payload, indent=1) + "\n")
    (out / f"{name}.md").write_text(_markdown(results, args.quick, args.only))
    failed = [r for r in results if r.status == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
