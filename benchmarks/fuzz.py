"""Fuzz campaign: mutated ONNX files through ``analyze``, ``check`` and compile, each run confined.

Why: a deployment step must fail with a documented exit code and one line naming the
problem, whatever file it is handed; an "internal error" (exit 70), a hang or a runaway
allocation on hostile input is a bug. This script builds mutated copies of the bundled
models (``benchmarks/fuzz_mutators.py``, deterministic from ``--seed``), runs every command
on every file in a child process with a wall-clock timeout and an address-space limit
(``RLIMIT_AS``), and checks that

- the exit code is 0 or a documented one (README "Exit codes": 1-6), never 70 or a signal;
- a failing run prints exactly one ``mpcompile: error:`` line on stderr and no traceback;
- the run ends within the timeout and under the memory limit;
- the input folder (model and external data) is byte-identical afterwards.

Children are forked from this interpreter after mpcompile is imported (``--runner fork``,
the default: ~100x cheaper than a fresh interpreter per run, so 1,000+ files fit in a few
minutes of one core); ``--runner exec`` runs ``python -m mpcompile`` in a real subprocess
with ``preexec_fn`` limits instead, for the exact CLI a user gets.

Usage::

    python benchmarks/fuzz.py                 # >= 1,000 files, compile on every 4th, 15 min budget
    python benchmarks/fuzz.py --quick         # 2 files per mutation class
    python benchmarks/fuzz.py --count 200 --seed 7 --keep /tmp/fuzz   # keep the files

Writes ``benchmarks/results/fuzz.json`` and ``fuzz.md`` (``fuzz_quick.*`` with --quick);
exits 1 if any run violated a rule above.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(HERE.parent))

from benchmarks.fuzz_mutators import MUTATIONS, FuzzCase, folder_digest, make_case, plan_cases  # noqa: E402

DOCUMENTED_EXIT_CODES = frozenset({0, 1, 2, 3, 4, 5, 6})
COMMANDS = ("analyze", "check", "compile")
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MEMORY_BYTES = 3 * 2**30


@dataclass
class RunResult:
    """One command on one mutated file, and whether it kept the rules."""

    case: str
    mutation: str
    source: str
    command: str
    exit_code: int | None  # None: killed (timeout) or died of a signal
    seconds: float
    message: str  # the error line (or the first stderr line), for the summary
    violations: list[str] = field(default_factory=list)


def _argv(command: str, model: Path, out_dir: Path) -> list[str]:
    if command == "analyze":
        return ["-q", "analyze", str(model), "--json"]
    if command == "check":
        return ["-q", "check", str(model)]
    out = out_dir / "out.onnx"
    return ["-q", "compile", str(model), "-o", str(out)]


def _limit(memory_bytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))


def _run_fork(argv: list[str], log: Path, timeout_s: float, memory_bytes: int) -> tuple[int | None, float]:
    """Run ``mpcompile.cli.main(argv)`` in a forked child; return (exit code or None, seconds)."""
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child
        code = 70
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(fd, 2)
            # The parent's sys.stdout/stderr may be objects of its own (pytest's capture).
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            _limit(memory_bytes)
            from mpcompile.cli import main

            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 2
        except BaseException as exc:  # noqa: BLE001 - reported as a violation below
            try:
                os.write(2, f"fuzz: child raised {type(exc).__name__}: {exc}\n".encode())
            except OSError:
                pass
            code = 71
        finally:
            try:
                sys.stderr.flush()
            except Exception:  # noqa: BLE001
                pass
            os._exit(code)
    deadline = start + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.perf_counter() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None, time.perf_counter() - start
        time.sleep(0.005)
    seconds = time.perf_counter() - start
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status), seconds
    return None, seconds


def _run_exec(argv: list[str], log: Path, timeout_s: float, memory_bytes: int) -> tuple[int | None, float]:
    start = time.perf_counter()
    with open(log, "wb") as err:
        try:
            proc = subprocess.run([sys.executable, "-m", "mpcompile", *argv], stdout=subprocess.DEVNULL,
                                  stderr=err, timeout=timeout_s, preexec_fn=lambda: _limit(memory_bytes),
                                  check=False)
        except subprocess.TimeoutExpired:
            return None, time.perf_counter() - start
    code = proc.returncode
    return (code if code >= 0 else None), time.perf_counter() - start


def judge(command: str, exit_code: int | None, stderr: str, timed_out: bool) -> tuple[str, list[str]]:
    """The rules of the campaign, applied to one run: (message, violations)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("mpcompile: error:")]
    message = errors[0] if errors else (lines[-1] if lines else "")
    violations = []
    if timed_out:
        violations.append("timeout")
    elif exit_code is None:
        violations.append("killed by a signal")
    elif exit_code == 70:
        violations.append("internal error (exit 70)")
    elif exit_code not in DOCUMENTED_EXIT_CODES:
        violations.append(f"undocumented exit code {exit_code}")
    if "Traceback" in stderr or "MemoryError" in stderr:
        violations.append("traceback or MemoryError on stderr")
    if exit_code not in (None, 0, 1, 70) and len(errors) != 1:
        violations.append(f"{len(errors)} 'mpcompile: error:' lines (expected one)")
    return message[:300], violations


def run_case(case: FuzzCase, root: Path, commands: tuple[str, ...], *, runner: str = "fork",
             timeout_s: float = DEFAULT_TIMEOUT_S, memory_bytes: int = DEFAULT_MEMORY_BYTES) -> list[RunResult]:
    """Build ``case`` under ``root`` and run each command on it; the rules are checked per run."""
    model = make_case(case, root)
    folder = model.parent
    before = folder_digest(folder)
    out_dir = root / f"{case.name}.out"
    out_dir.mkdir(exist_ok=True)
    run = _run_fork if runner == "fork" else _run_exec
    results = []
    for command in commands:
        log = out_dir / f"{command}.stderr"
        code, seconds = run(_argv(command, model, out_dir), log, timeout_s, memory_bytes)
        stderr = log.read_text(errors="replace") if log.exists() else ""
        message, violations = judge(command, code, stderr, timed_out=code is None and seconds >= timeout_s)
        if folder_digest(folder) != before:
            violations.append("input modified")
        results.append(RunResult(case.name, case.mutation, case.source, command, code, round(seconds, 3),
                                 message, violations))
    return results


def summarise(results: list[RunResult]) -> dict:
    table: dict[str, dict[str, dict[str, int]]] = {}
    for r in results:
        cell = table.setdefault(r.mutation, {}).setdefault(r.command, {})
        key = "timeout" if r.exit_code is None else str(r.exit_code)
        cell[key] = cell.get(key, 0) + 1
    per_command = collections.Counter(r.command for r in results)
    return {
        "files": len({r.case for r in results}),
        "runs": len(results),
        "runs_per_command": dict(per_command),
        "violations": sum(1 for r in results if r.violations),
        "internal_errors": sum(1 for r in results if r.exit_code == 70),
        "timeouts": sum(1 for r in results if r.exit_code is None),
        "exit_codes": table,
    }


def render_markdown(summary: dict, meta: dict, bad: list[RunResult]) -> str:
    lines = [
        "# Fuzz campaign",
        "",
        f"{meta['created']}: {summary['files']} mutated files (seed {meta['seed']}), {summary['runs']} runs "
        f"({', '.join(f'{k} {v}' for k, v in summary['runs_per_command'].items())}), runner `{meta['runner']}`, "
        f"timeout {meta['timeout_s']} s, RLIMIT_AS {meta['memory_bytes'] // 2**20} MiB, {meta['seconds']:.0f} s.",
        "",
        f"**Violations: {summary['violations']}** (internal errors {summary['internal_errors']}, "
        f"timeouts {summary['timeouts']}).",
        "",
        "Exit codes per mutation class and command (code: runs):",
        "",
        "| mutation | " + " | ".join(COMMANDS) + " |",
        "|---|" + "---|" * len(COMMANDS),
    ]
    for mutation, cells in summary["exit_codes"].items():
        row = [", ".join(f"{k}: {v}" for k, v in sorted(cells.get(c, {}).items())) or "-" for c in COMMANDS]
        lines.append(f"| {mutation} | " + " | ".join(row) + " |")
    if bad:
        lines += ["", "## Violations", ""]
        lines += [f"- `{r.case}` {r.command}: exit {r.exit_code}, {'; '.join(r.violations)}: {r.message}"
                  for r in bad[:100]]
    return "\n".join(lines) + "\n"


def campaign(count: int, seed: int, *, compile_every: int, runner: str, timeout_s: float, memory_bytes: int,
             budget_s: float, keep: Path | None, mutations: tuple[str, ...] | None = None,
             progress: bool = True) -> tuple[list[RunResult], dict]:
    """Run ``count`` cases (stopping early when ``budget_s`` is spent); return results and metadata."""
    if runner == "fork":
        import mpcompile.cli  # noqa: F401 - imported once, inherited by every forked child
        import mpcompile.commands.compile  # noqa: F401
    root = keep or Path(tempfile.mkdtemp(prefix="mpcompile-fuzz-"))
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results: list[RunResult] = []
    mutator_errors: list[str] = []
    try:
        for case in plan_cases(count, seed, mutations):
            if time.perf_counter() - start > budget_s:
                print(f"fuzz: time budget of {budget_s:.0f} s spent after {case.index} files", file=sys.stderr)
                break
            commands = COMMANDS if compile_every and case.index % compile_every == 0 else COMMANDS[:2]
            try:
                case_results = run_case(case, root, commands, runner=runner, timeout_s=timeout_s,
                                        memory_bytes=memory_bytes)
            except Exception as exc:  # noqa: BLE001 - a mutator bug, not an mpcompile one: report, go on
                mutator_errors.append(f"{case.name}: {type(exc).__name__}: {exc}")
                print(f"fuzz: mutator failed on {case.name}: {exc!r}", file=sys.stderr)
                continue
            results += case_results
            for r in case_results:
                if r.violations and progress:
                    print(f"VIOLATION {r.case} {r.command} exit={r.exit_code}: {'; '.join(r.violations)}: "
                          f"{r.message}", file=sys.stderr, flush=True)
            if keep is None:
                shutil.rmtree(root / case.name, ignore_errors=True)
                shutil.rmtree(root / f"{case.name}.out", ignore_errors=True)
            if progress and case.index % 50 == 49:
                print(f"fuzz: {case.index + 1} files, {time.perf_counter() - start:.0f} s", file=sys.stderr,
                      flush=True)
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    meta = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "seed": seed,
            "runner": runner, "timeout_s": timeout_s, "memory_bytes": memory_bytes,
            "compile_every": compile_every, "seconds": round(time.perf_counter() - start, 1),
            "mutator_errors": mutator_errors}
    return results, meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/fuzz.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 files per mutation class, compile on each")
    parser.add_argument("--count", type=int, default=1140, help="mutated files (default 1140 = 60 per class)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile-every", type=int, default=4, help="compile every Nth file (0: never)")
    parser.add_argument("--runner", choices=("fork", "exec"), default="fork")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per run")
    parser.add_argument("--memory-mb", type=int, default=DEFAULT_MEMORY_BYTES // 2**20, help="RLIMIT_AS per run")
    parser.add_argument("--budget", type=float, default=900.0, help="stop starting new files after this many s")
    parser.add_argument("--keep", type=Path, help="build the files here and keep them")
    args = parser.parse_args(argv)
    count = 2 * len(MUTATIONS) if args.quick else args.count
    compile_every = 1 if args.quick else args.compile_every
    results, meta = campaign(count, args.seed, compile_every=compile_every, runner=args.runner,
                             timeout_s=args.timeout, memory_bytes=args.memory_mb * 2**20,
                             budget_s=args.budget, keep=args.keep)
    summary = summarise(results)
    bad = [r for r in results if r.violations]
    stem = "fuzz_quick" if args.quick else "fuzz"
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    payload = {"meta": meta, "summary": summary, "violations": [asdict(r) for r in bad],
               "messages_sample": sorted({f"{r.mutation}/{r.command}: {r.message}" for r in results
                                          if r.exit_code not in (0, None)})[:300]}
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{stem}.md").write_text(render_markdown(summary, meta, bad))
    print(f"fuzz: {summary['files']} files, {summary['runs']} runs, {summary['violations']} violations "
          f"({summary['internal_errors']} internal errors, {summary['timeouts']} timeouts) in {meta['seconds']} s; "
          f"results in {out / stem}.json")
    return 1 if bad or meta["mutator_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
