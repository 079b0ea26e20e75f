"""Measured 2:4 GEMM audit with torch (cuSPARSELt / CUTLASS) next to the modeled speedup.

Why: DESIGN §5 asks for speedups measured where a GPU exists and modeled (and labelled) where it
does not, each with its Amdahl bound. This script measures, on the present GPU, every GEMM shape
of three workloads — the bundled digits models, all-MiniLM-L6-v2 (hidden 384, MLP 1536, 6 layers,
128 tokens) and ViT-B/16 (hidden 768, MLP 3072, 12 layers, 197 tokens) — at batch sizes 1, 8, 32
and 128, dense ``F.linear`` vs ``to_sparse_semi_structured`` 2:4 FP16 weights, and puts the
roofline model of :mod:`mpcompile.trt.model` for the same GPU beside it. The measured figures are
kernel level (GEMMs only, no TensorRT tactic choice); the modeled ones say what a roofline allows.

Usage (needs only numpy + a CUDA build of torch; ``onnx`` is used, when installed, to read the
bundled models' shapes)::

    python benchmarks/gpu_audit.py               # writes benchmarks/results/gpu_audit_<gpu>.json
    python benchmarks/gpu_audit.py --quick       # batch 1 and 32, fewer iterations

Without CUDA it prints why and exits with status 6, writing nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script: make `mpcompile` importable from the checkout
    sys.path.insert(0, str(HERE.parent))

from mpcompile.errors import MpcompileError
from mpcompile.trt.model import (
    GPUS,
    LayerShape,
    amdahl_bound,
    find_gpu_spec,
    gemm_time_us,
    model_speedup,
)

logger = logging.getLogger("gpu_audit")

RESULTS_DIR = HERE / "results"
BATCH_SIZES = (1, 8, 32, 128)
QUICK_BATCH_SIZES = (1, 32)
REFERENCE_GPUS = ("A40", "A100-SXM4-80GB")
BUNDLED = ("digits_mlp", "digits_cnn", "digits_vit")


@dataclass(frozen=True)
class Gemm:
    """One GEMM of a workload: ``rows_per_sample`` rows per batch element; ``sparse``: would be 2:4."""

    name: str
    out_features: int
    in_features: int
    rows_per_sample: int
    sparse: bool = True
    why_dense: str | None = None


def minilm_l6() -> list[Gemm]:
    """all-MiniLM-L6-v2: BERT encoder, 6 layers, hidden 384, intermediate 1536, 128 tokens."""
    gemms = []
    for i in range(6):
        p = f"encoder.layer.{i}"
        for proj in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense"):
            gemms.append(Gemm(f"{p}.{proj}", 384, 384, 128))
        gemms.append(Gemm(f"{p}.intermediate.dense", 1536, 384, 128))
        gemms.append(Gemm(f"{p}.output.dense", 384, 1536, 128))
    return gemms


def vit_b16() -> list[Gemm]:
    """ViT-B/16 at 224²: patch-embed conv as im2col (K = 3·16·16), 12 blocks, 197 tokens, head."""
    gemms = [Gemm("patch_embed", 768, 3 * 16 * 16, 196, False, "RGB stem: Cin=3 < 16 stays dense")]
    for i in range(12):
        p = f"blocks.{i}"
        for proj in ("attn.q", "attn.k", "attn.v", "attn.proj"):
            gemms.append(Gemm(f"{p}.{proj}", 768, 768, 197))
        gemms.append(Gemm(f"{p}.mlp.fc1", 3072, 768, 197))
        gemms.append(Gemm(f"{p}.mlp.fc2", 768, 3072, 197))
    gemms.append(Gemm("head", 1000, 768, 1))
    return gemms


def bundled_gemms(name: str) -> list[Gemm]:
    """GEMM shapes of a bundled digits model, read from its ONNX file (needs ``onnx``)."""
    import onnx
    from onnx import numpy_helper, shape_inference

    path = HERE.parent / "mpcompile" / "data" / f"{name}.onnx"
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t).shape for t in model.graph.initializer}
    inferred = shape_inference.infer_shapes(model)
    shapes: dict[str, list[int | None]] = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]

    def per_sample(dims: list[int | None] | None) -> int:
        inner = [d for d in (dims or [])[1:] if d is not None]
        return int(np.prod(inner)) if inner else 1

    gemms = []
    for i, node in enumerate(model.graph.node):
        label = node.name or f"{node.op_type}_{i}"
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in inits:
            k, n = inits[node.input[1]][-2:]
            rows = per_sample(shapes.get(node.input[0], [None])[:-1])
            gemms.append(Gemm(label, int(n), int(k), rows))
        elif node.op_type == "Gemm" and node.input[1] in inits:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            b = inits[node.input[1]]
            n, k = (b[0], b[1]) if trans_b else (b[1], b[0])
            gemms.append(Gemm(label, int(n), int(k), 1))
        elif node.op_type == "Conv" and node.input[1] in inits:
            cout, cin_g, *kernel = inits[node.input[1]]
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            spatial = [d for d in (shapes.get(node.output[0]) or [])[2:] if d is not None]
            rows = int(np.prod(spatial)) if spatial else 1  # output [N, C, H, W]: H·W rows per sample
            k = int(cin_g * np.prod(kernel))
            if group != 1:
                gemms.append(Gemm(label, int(cout), k, rows, False, f"grouped conv (group={group})"))
            elif cin_g < 16:
                gemms.append(Gemm(label, int(cout), k, rows, False, f"Cin={cin_g} < 16 stays dense"))
            else:
                gemms.append(Gemm(label, int(cout), k, rows))
    return gemms


def workloads() -> tuple[dict[str, list[Gemm]], list[str]]:
    notes = []
    loads: dict[str, list[Gemm]] = {}
    for name in BUNDLED:
        try:
            loads[name] = bundled_gemms(name)
        except ImportError:
            notes.append(f"{name}: skipped (onnx not installed)")
        except (OSError, ValueError) as exc:  # missing file, unreadable model
            notes.append(f"{name}: skipped ({exc})")
    loads["all-MiniLM-L6-v2"] = minilm_l6()
    loads["ViT-B/16"] = vit_b16()
    return loads, notes


def prune_24(weight: np.ndarray) -> np.ndarray:
    """Keep the 2 largest |w| of every 4 consecutive inputs of every output row."""
    out, k = weight.shape
    groups = weight.reshape(out, k // 4, 4)
    order = np.argsort(np.abs(groups), axis=2)
    mask = np.ones_like(groups, dtype=bool)
    np.put_along_axis(mask, order[:, :, :2], False, axis=2)
    return (groups * mask).reshape(out, k)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "gpu"


def _shape_key(out_features: int, in_features: int, rows: int) -> str:
    return f"{out_features}x{in_features}@{rows}"


def measured_summary(gemms: list[Gemm], batch: int, timed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """GEMM-only sums over every layer instance, from the per-shape timings."""
    dense = sparse_all = best = marked = 0.0
    missing = []
    for g in gemms:
        t = timed.get(_shape_key(g.out_features, g.in_features, g.rows_per_sample * batch))
        if t is None:
            missing.append(g.name)
            continue
        d = t["dense"]["median_ms"]
        s = t["sparse"]["median_ms"] if (t["sparse"] and g.sparse) else d
        dense += d
        sparse_all += s
        best += min(d, s)
        marked += d if g.sparse and t["sparse"] else 0.0
    if dense == 0.0:
        return {"skipped": "no layer could be timed", "untimed_layers": missing}
    fraction = marked / dense
    return {
        "gemm_dense_ms": dense,
        "gemm_sparse_ms": sparse_all,
        "gemm_best_of_ms": best,
        "gemm_speedup_all_sparse": dense / sparse_all,
        "gemm_speedup_best_of": dense / best,
        "sparse_fraction_of_gemm_time": fraction,
        "amdahl_bound_gemm_only": amdahl_bound(min(1.0, fraction)),
        "untimed_layers": missing,
    }


def modeled(gemms: list[Gemm], batch: int, gpu: str) -> dict[str, Any]:
    shapes = [LayerShape(g.name, g.rows_per_sample * batch, g.in_features, g.out_features, g.sparse)
              for g in gemms]
    result = model_speedup(shapes, gpu).to_dict()
    roofline_only = model_speedup(shapes, gpu, apply_pick_prediction=False)
    result["speedup_without_pick_prediction"] = roofline_only.speedup
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 and 32, fewer iterations")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--inner", type=int, default=10, help="calls per timed sample")
    parser.add_argument("--backend", choices=("auto", "cusparselt", "cutlass"), default="auto")
    parser.add_argument("--eager", action="store_true",
                        help="time eager calls (includes host dispatch) instead of CUDA-graph replays")
    parser.add_argument("--out", type=Path, default=None, help="output JSON (default results/gpu_audit_<gpu>.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    warmup = args.warmup if args.warmup is not None else (5 if args.quick else 10)
    iters = args.iters if args.iters is not None else (20 if args.quick else 50)
    batches = QUICK_BATCH_SIZES if args.quick else BATCH_SIZES

    loads, notes = workloads()
    unique: dict[str, tuple[int, int, int]] = {}
    for gemms in loads.values():
        for g in gemms:
            if g.in_features % 4:
                continue
            for batch in batches:
                key = _shape_key(g.out_features, g.in_features, g.rows_per_sample * batch)
                unique.setdefault(key, (g.out_features, g.in_features, g.rows_per_sample * batch))
    print(f"{sum(len(g) for g in loads.values())} GEMMs in {len(loads)} workloads, "
          f"{len(unique)} unique (shape, rows) to time at batch sizes {list(batches)}")

    try:
        from mpcompile.trt.torch_audit import audit_linear_layers, cuda_environment

        environment = cuda_environment()
    except MpcompileError as exc:
        print(f"no CUDA: {exc}")
        return getattr(exc, "exit_code", 6)

    rng = np.random.default_rng(0)
    layers = []
    for key, (out_features, in_features, rows) in unique.items():
        weight = prune_24(rng.standard_normal((out_features, in_features)).astype(np.float32) * 0.02)
        layers.append((key, weight.astype(np.float16), rows))
    print(f"timing on {environment['gpu']} (torch {environment['torch']}, CUDA {environment['cuda']})")
    start = time.perf_counter()
    audit = audit_linear_layers(layers, warmup=warmup, iters=iters, inner=args.inner,
                                backend=args.backend, graphs=not args.eager)
    seconds = time.perf_counter() - start
    timed = {layer.name: layer.to_dict() for layer in audit.layers}

    spec = find_gpu_spec(environment["gpu"])
    per_shape = []
    for layer in audit.layers:
        row = layer.to_dict()
        if spec is not None:
            shape = LayerShape(layer.name, layer.rows, layer.in_features, layer.out_features)
            row["modeled_speedup_roofline"] = (gemm_time_us(shape, spec, False)
                                               / gemm_time_us(shape, spec, True))
        per_shape.append(row)

    results: dict[str, Any] = {}
    for name, gemms in loads.items():
        results[name] = {}
        for batch in batches:
            entry: dict[str, Any] = {"batch": batch, "measured": measured_summary(gemms, batch, timed)}
            entry["measured"]["kind"] = "measured (GEMMs only, torch kernels)"
            if spec is not None:
                entry["modeled"] = modeled(gemms, batch, spec.name)
            entry["modeled_reference"] = {
                gpu: {k: v for k, v in modeled(gemms, batch, gpu).items() if k != "per_layer"}
                for gpu in REFERENCE_GPUS
            }
            results[name][str(batch)] = entry
            m = entry["measured"]
            if "gemm_speedup_best_of" in m:
                line = (f"{name:>18} bs{batch:<4} measured GEMM {m['gemm_speedup_all_sparse']:.2f}x "
                        f"(best-of {m['gemm_speedup_best_of']:.2f}x, bound {m['amdahl_bound_gemm_only']:.2f}x)")
                if spec is not None:
                    line += (f" | modeled {spec.name} e2e {entry['modeled']['speedup']:.2f}x "
                             f"(bound {entry['modeled']['amdahl_bound']:.2f}x)")
                print(line)

    if spec is None:
        notes.append(f"no datasheet entry for '{environment['gpu']}': modeled numbers only for "
                     f"{', '.join(REFERENCE_GPUS)} (known: {', '.join(GPUS)})")
    failures = [layer.name for layer in audit.layers if layer.error]
    if failures:
        notes.append(f"2:4 path failed for {len(failures)} shapes (see per_shape[].error)")
    report = {
        "benchmark": "gpu_audit",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "environment": environment,
        "gpu_spec": spec.to_dict() if spec else None,
        "settings": {"warmup": warmup, "iters": iters, "inner": args.inner, "backend": args.backend,
                     "cuda_graphs": not args.eager,
                     "batch_sizes": list(batches), "dtype": "float16"},
        "audit_seconds": seconds,
        "notes": notes + audit.notes,
        "per_shape": per_shape,
        "workloads": results,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS_DIR / f"gpu_audit_{slug(environment['gpu'])}.json"
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out} ({seconds:.1f} s of timing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
