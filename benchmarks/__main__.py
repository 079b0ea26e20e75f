"""``python -m benchmarks [--quick]``: run every benchmark, each in its own process.

Why subprocesses: each script measures wall time or peak RSS of fresh processes and pins its
own BLAS threads before numpy is imported (``permutation.py``), so they must not share an
interpreter; a crash in one must not stop the others either. Each script writes its own JSON
(and Markdown where it has one) under ``benchmarks/results/``; this runner prints one line per
script and exits non-zero if any script failed (crashed or could not run). A missed speed or
memory target is reported as ``missed``, not as a failure: timings on a shared 2-core machine
vary, and CI runs ``--quick`` as a smoke test. ``gpu_audit`` exits 6 without CUDA: skipped.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
logger = logging.getLogger("benchmarks")

TARGET_MISSED = 10  # analyze_speed: ran fine, a target was missed
# (name, script, exit code meaning "skipped: needs hardware this machine lacks")
BENCHMARKS = (
    ("mp_fit_accuracy", "mp_fit_accuracy.py", None),
    ("permutation", "permutation.py", None),
    ("analyze_speed", "analyze_speed.py", None),
    ("quality", "quality.py", None),
    ("recovery", "recovery.py", None),
    ("layer_choice", "layer_choice.py", None),
    ("compile_speed", "compile_speed.py", None),
    ("seed_methods", "seed_methods.py", None),
    ("fuzz", "fuzz.py", None),
    ("conformance", "conformance.py", None),
    ("gpu_audit", "gpu_audit.py", 6),
    ("speedup_model_fit", "speedup_model_fit.py", None),
    ("scale_7b", "scale_7b.py", 6),  # 6: too little free disk for the generated 7B model
)


@dataclass
class Outcome:
    name: str
    status: str  # ok | failed | skipped | missed | missing
    returncode: int | None
    seconds: float


def run_one(name: str, script: str, skip_code: int | None, quick: bool) -> Outcome:
    path = HERE / script
    if not path.exists():
        print(f"-- {name}: {script} not present, skipped", flush=True)
        return Outcome(name, "missing", None, 0.0)
    command = [sys.executable, str(path), *(["--quick"] if quick else [])]
    print(f"-- {name}: {' '.join(['python', *command[1:]])}", flush=True)
    start = time.perf_counter()
    returncode = subprocess.run(command, cwd=HERE.parent, check=False).returncode
    seconds = time.perf_counter() - start
    if returncode == 0:
        status = "ok"
    elif skip_code is not None and returncode == skip_code:
        status = "skipped"
    elif returncode == TARGET_MISSED:
        status = "missed"
    else:
        status = "failed"
    return Outcome(name, status, returncode, seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    parser.add_argument("--only", nargs="+", choices=[b[0] for b in BENCHMARKS], help="run only these")
    args = parser.parse_args(argv)
    outcomes = [run_one(name, script, skip, args.quick) for name, script, skip in BENCHMARKS
                if not args.only or name in args.only]
    print("\nbenchmark        status    exit  seconds")
    for o in outcomes:
        rc = "" if o.returncode is None else str(o.returncode)
        print(f"{o.name:<16} {o.status:<9} {rc:>4} {o.seconds:>8.1f}")
    print("(missed: ran, but a speed/memory target was missed; see each script's output and JSON)")
    return 1 if any(o.status == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
