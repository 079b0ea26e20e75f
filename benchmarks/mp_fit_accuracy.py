"""Accuracy and speed of the Marchenko–Pastur fit ``fit_mp`` against synthetic ground truth.

Why this shape: every spectral decision mpcompile makes (spike count, bulk edge σ+, the
noise level σ²) comes from ``mpcompile.numerics.mp_law.fit_mp``, and on real weights there is
no ground truth to judge it by. So the weights here are generated with numpy from fixed seeds
and the truth is known by construction:

1. **Pure noise** — iid N(0, v) float32 matrices for v = 0.02² (weight-like scale) and v = 1.
   Shapes cover aspect ratios γ = p/n ∈ {0.1, 0.25, 0.5, 1} at several sizes, in *both*
   orientations (rows < cols and rows > cols, drawn independently), up to the ViT-B MLP shapes
   768×3072 / 3072×768 (and 1536×3072 in full mode). Reported: relative σ² error |σ̂²−v|/v,
   relative error of the fitted edge σ̂+ against the theory edge √v(√n+√p), spikes found
   (every one is a false positive), and seconds per ``fit_mp`` call (median over all calls on
   that shape). The two variances reuse the same standard-normal draw, so their errors must
   agree to float32 rounding: that is an exact check that the fit is scale-equivariant. As a
   yardstick each row also shows the error of the Frobenius "oracle" ‖W‖²_F/(pn), the best a
   σ² estimate can do when it knows the matrix is pure noise (BEMA must not assume that).
2. **Planted spikes** — the same noise (v = 0.02²) plus a rank-k signal U·diag(θ)·Vᵀ with
   random orthonormal U, V and k ∈ {4, 16} equal singular values θ. Two regimes:
   *well above* — θ = 1.1, 2 and 5 × σ+ (σ+ = √v(√n+√p) is the bulk edge). Note that the BBP
   detection threshold for a signal singular value is θc = √v·(pn)^¼ ≤ σ+/2, so even 1.1×σ+ is
   ≥ 2.2×θc and its outlier sits ~1.3× beyond the edge: an exact count k is expected.
   *near threshold* — θ = 1.1 and 1.3 × θc, whose predicted outliers
   √((t²+v)(t²+γv))/t·√n (t = θ/√n; Benaych-Georges & Nadakuditi 2012) land within a few
   per cent of the edge, i.e. around the Tracy–Widom-widened spike threshold: misses are
   expected there and are reported, not hidden. Each row shows the predicted outlier and the
   theoretical threshold (true σ², default 99 % TW margin) in units of σ+, plus the smallest
   observed planted singular value, so a miss can be told from a fit error.

``fit_mp`` runs with its defaults (α = 0.25, TW confidence 0.99), i.e. what ``mpcompile
analyze`` uses. In the spike cases the fit is called as its two halves
(``matrix_eigenvalues`` then ``fit_mp_from_eigenvalues`` — exactly ``fit_mp``'s body) so the
observed outliers can be read off the same eigenvalues without a second decomposition. The
ViT-B 768×3072 shape also gets a split timing of those two halves.

Usage::

    python benchmarks/mp_fit_accuracy.py            # full grid (~20 s on an idle 2-core machine)
    python benchmarks/mp_fit_accuracy.py --quick    # small subset (< 30 s on 2 cores)

Writes ``benchmarks/results/mp_fit_accuracy.json`` and ``.md`` (``mp_fit_accuracy_quick.*``
with --quick). BLAS threads are inherited from the environment (recorded in the JSON). Times are
wall clock of one process: run on an otherwise idle machine (the load average at start and end
is recorded), since an oversubscribed OpenBLAS inflates them many-fold.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(HERE.parent))

from benchmarks.analyze_speed import run_header, save_results  # noqa: E402
from mpcompile.numerics.mp_law import (  # noqa: E402
    fit_mp,
    fit_mp_from_eigenvalues,
    matrix_eigenvalues,
    tracy_widom_margin,
)

RESULTS_DIR = HERE / "results"
VARIANCES = (0.02**2, 1.0)
SPIKE_VARIANCE = 0.02**2
GAMMAS = (0.1, 0.25, 0.5, 1.0)
TW_CONFIDENCE = 0.99  # fit_mp's default
VIT_SHAPES = ((768, 3072), (3072, 768))
RANKS = (4, 16)
# (regime, unit, multiple): the signal singular value θ = multiple × unit.
STRENGTHS = (("well_above", "sigma_plus", 1.1), ("well_above", "sigma_plus", 2.0),
             ("well_above", "sigma_plus", 5.0),
             ("near_threshold", "bbp", 1.1), ("near_threshold", "bbp", 1.3))


# ----------------------------------------------------------------------- grids


def noise_shapes(quick: bool) -> list[tuple[int, int]]:
    """(rows, cols) for the pure-noise grid: each (p, n) in both orientations, squares once."""
    if quick:
        grid = [(256, 0.25), (256, 1.0), (768, 0.1), (768, 0.5), (768, 1.0), (3072, 0.25)]
    else:
        grid = [(n, g) for n in (256, 768) for g in GAMMAS]
        grid += [(3072, g) for g in (0.1, 0.25, 0.5)]  # 3072² eigvalsh would dominate the budget
    shapes = []
    for n, gamma in grid:
        p = round(gamma * n)
        shapes += [(n, n)] if p == n else [(p, n), (n, p)]
    return shapes


def spike_shapes(quick: bool) -> list[tuple[int, int]]:
    if quick:
        return [(768, 768), (768, 3072), (3072, 768)]
    return [(768, 768), (384, 768), (768, 3072), (3072, 768), (307, 3072), (192, 768)]


def nominal_gamma(rows: int, cols: int) -> float:
    """The grid's γ the shape was built from (p = round(γn) makes the exact ratio differ)."""
    gamma = min(rows, cols) / max(rows, cols)
    return min(GAMMAS, key=lambda g: abs(g - gamma))


# ----------------------------------------------------------------------- generation


def noise(rows: int, cols: int, seed: int, rep: int) -> np.ndarray:
    """Standard-normal float32 draw; the same (shape, seed, rep) always gives the same matrix."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0, rows, cols, rep]))
    return rng.standard_normal((rows, cols), dtype=np.float32)


def planted_signal(rows: int, cols: int, k: int, theta: float, seed: int, rep: int) -> np.ndarray:
    """Rank-k U·diag(θ)·Vᵀ with random orthonormal U (rows×k), V (cols×k), all singular values θ."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1, rows, cols, k, rep]))
    u, _ = np.linalg.qr(rng.standard_normal((rows, k)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, k)))
    return ((u * theta) @ v.T).astype(np.float32)


# ----------------------------------------------------------------------- theory


def theory_edge(v: float, rows: int, cols: int) -> float:
    """σ+ = √v(√n + √p): the bulk edge in singular-value units."""
    return math.sqrt(v) * (math.sqrt(rows) + math.sqrt(cols))


def bbp_threshold(v: float, rows: int, cols: int) -> float:
    """Signal singular value at which an outlier separates from the bulk: √v·(pn)^¼."""
    return math.sqrt(v) * (rows * cols) ** 0.25


def predicted_outlier(theta: float, v: float, rows: int, cols: int) -> float:
    """Large-n location of the singular value of noise + θ·u·vᵀ (the edge below the BBP threshold)."""
    n, p = max(rows, cols), min(rows, cols)
    gamma, t = p / n, theta / math.sqrt(n)
    if theta <= bbp_threshold(v, rows, cols):
        return theory_edge(v, rows, cols)
    return math.sqrt(n) * math.sqrt((t * t + v) * (t * t + gamma * v)) / t


def theory_spike_threshold(v: float, rows: int, cols: int) -> float:
    """fit_mp's spike threshold if it had recovered σ² = v exactly."""
    n, p = max(rows, cols), min(rows, cols)
    gamma = p / n
    margin = tracy_widom_margin(gamma, n, TW_CONFIDENCE)
    return math.sqrt(n * v * ((1.0 + math.sqrt(gamma)) ** 2 + margin))


# ----------------------------------------------------------------------- measurements


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def run_noise(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows_out = []
    for rows, cols in noise_shapes(args.quick):
        p, n = min(rows, cols), max(rows, cols)
        fits, times = [], []
        for rep in range(args.seeds):
            z = noise(rows, cols, args.seed, rep)
            for v in VARIANCES:
                w = z * np.float32(math.sqrt(v))
                start = time.perf_counter()
                fit = fit_mp(w)
                times.append(time.perf_counter() - start)
                edge = theory_edge(v, rows, cols)
                oracle = float(fit.frobenius_norm) ** 2 / (p * n)
                fits.append({
                    "rep": rep, "v": v, "sigma2": fit.sigma2,
                    "sigma2_rel_err": _rel(fit.sigma2, v),
                    "sigma2_signed_rel_err": (fit.sigma2 - v) / v,
                    "sigma2_rel_err_frob_oracle": _rel(oracle, v),
                    "sigma_plus_rel_err": _rel(fit.sigma_plus, edge),
                    "spikes": fit.spikes,
                    "above_plain_edge": int(round((1.0 - fit.bulk_fraction) * p)),
                    "top_over_theory_edge": fit.spectral_norm / edge,
                    "fit_error": fit.fit_error,
                })
            del z
        errs = [f["sigma2_rel_err"] for f in fits]
        by_rep: dict[int, list[float]] = {}
        for f in fits:
            by_rep.setdefault(f["rep"], []).append(f["sigma2_rel_err"])
        row = {
            "shape": [rows, cols], "orientation": "square" if rows == cols else
            ("rows<cols" if rows < cols else "rows>cols"),
            "gamma": p / n, "gamma_nominal": nominal_gamma(rows, cols), "fits": len(fits),
            "sigma2_rel_err_median": statistics.median(errs), "sigma2_rel_err_max": max(errs),
            "sigma2_signed_rel_err_median": statistics.median(f["sigma2_signed_rel_err"] for f in fits),
            "oracle_rel_err_median": statistics.median(f["sigma2_rel_err_frob_oracle"] for f in fits),
            "sigma_plus_rel_err_max": max(f["sigma_plus_rel_err"] for f in fits),
            "false_positive_fits": sum(f["spikes"] > 0 for f in fits),
            "false_positive_spikes": sum(f["spikes"] for f in fits),
            "above_plain_edge_max": max(f["above_plain_edge"] for f in fits),
            "top_over_theory_edge_max": max(f["top_over_theory_edge"] for f in fits),
            "scale_invariance_max_abs_diff": max(max(e) - min(e) for e in by_rep.values()),
            "seconds_per_fit_median": statistics.median(times),
            "seconds_per_fit_min": min(times),
            "seconds_per_fit_all": [round(t, 5) for t in times],
            "per_fit": fits,
        }
        rows_out.append(row)
        print(f"  noise {rows:>5}x{cols:<5} γ={p / n:.3f}  σ² err median {row['sigma2_rel_err_median']:.2e} "
              f"max {row['sigma2_rel_err_max']:.2e} (oracle {row['oracle_rel_err_median']:.1e})  "
              f"σ+ err max {row['sigma_plus_rel_err_max']:.1e}  FP {row['false_positive_fits']}/{len(fits)}  "
              f"{row['seconds_per_fit_median'] * 1e3:.1f} ms/fit", flush=True)
    return rows_out


def run_spikes(args: argparse.Namespace) -> list[dict[str, Any]]:
    v = SPIKE_VARIANCE
    out = []
    for rows, cols in spike_shapes(args.quick):
        p, n = min(rows, cols), max(rows, cols)
        edge, bbp = theory_edge(v, rows, cols), bbp_threshold(v, rows, cols)
        threshold = theory_spike_threshold(v, rows, cols)
        noises = [noise(rows, cols, args.seed, rep) * np.float32(math.sqrt(v))
                  for rep in range(args.spike_seeds)]
        for k in RANKS:
            for regime, unit, multiple in STRENGTHS:
                theta = multiple * (edge if unit == "sigma_plus" else bbp)
                predicted = predicted_outlier(theta, v, rows, cols)
                found, errs, smallest, times = [], [], [], []
                for rep, z in enumerate(noises):
                    w = z + planted_signal(rows, cols, k, theta, args.seed, rep)
                    start = time.perf_counter()
                    eig = matrix_eigenvalues(w)
                    fit = fit_mp_from_eigenvalues(eig, rows, cols)
                    times.append(time.perf_counter() - start)
                    s_desc = np.sqrt(np.sort(eig)[::-1])
                    found.append(fit.spikes)
                    errs.append((fit.sigma2 - v) / v)
                    smallest.append(float(s_desc[k - 1]) / edge)
                row = {
                    "shape": [rows, cols], "gamma": p / n, "k": k, "regime": regime,
                    "strength": f"{multiple:g}x {'sigma+' if unit == 'sigma_plus' else 'BBP'}",
                    "theta": theta, "theta_over_bbp": theta / bbp, "theta_over_edge": theta / edge,
                    "predicted_outlier_over_edge": predicted / edge,
                    "theory_threshold_over_edge": threshold / edge,
                    "expected_detectable": predicted > threshold,
                    "found": found, "exact": sum(f == k for f in found), "reps": len(found),
                    "smallest_planted_observed_over_edge": smallest,
                    "sigma2_rel_err_median": statistics.median(abs(e) for e in errs),
                    "sigma2_rel_err_max": max(abs(e) for e in errs),
                    "sigma2_signed_rel_err_median": statistics.median(errs),
                    "seconds_per_fit_median": statistics.median(times),
                }
                out.append(row)
                print(f"  spikes {rows:>5}x{cols:<5} k={k:<2} θ={row['strength']:<12} "
                      f"pred {row['predicted_outlier_over_edge']:.3f}·σ+ (thr "
                      f"{row['theory_threshold_over_edge']:.3f})  found {found}  "
                      f"σ² err max {row['sigma2_rel_err_max']:.2e}", flush=True)
        del noises
    return out


def time_vit(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Split timing of fit_mp on the ViT-B MLP shapes: Gram + eigvalsh vs the fit itself."""
    out = []
    for rows, cols in VIT_SHAPES:
        w = noise(rows, cols, args.seed, 0) * np.float32(0.02)
        eig_t, fit_t, total_t = [], [], []
        for _ in range(args.timing_repeats):
            start = time.perf_counter()
            eig = matrix_eigenvalues(w)
            mid = time.perf_counter()
            fit_mp_from_eigenvalues(eig, rows, cols)
            end = time.perf_counter()
            eig_t.append(mid - start)
            fit_t.append(end - mid)
            start = time.perf_counter()
            fit_mp(w)
            total_t.append(time.perf_counter() - start)
        out.append({"shape": [rows, cols], "dtype": "float32", "repeats": args.timing_repeats,
                    "fit_mp_s_median": statistics.median(total_t),
                    "fit_mp_s_min": min(total_t),
                    "eigenvalues_s_median": statistics.median(eig_t),
                    "fit_from_eigenvalues_s_median": statistics.median(fit_t)})
        print(f"  timing {rows}x{cols}: fit_mp {out[-1]['fit_mp_s_median'] * 1e3:.1f} ms median "
              f"(Gram+eigvalsh {out[-1]['eigenvalues_s_median'] * 1e3:.1f} ms, fit "
              f"{out[-1]['fit_from_eigenvalues_s_median'] * 1e6:.0f} µs)", flush=True)
    return out


# ----------------------------------------------------------------------- summary


def summarize(noise_rows: list[dict[str, Any]], spike_rows: list[dict[str, Any]],
              timing: list[dict[str, Any]]) -> dict[str, Any]:
    by_gamma = {}
    for gamma in GAMMAS:
        fits = [f for r in noise_rows if r["gamma_nominal"] == gamma for f in r["per_fit"]]
        if not fits:
            continue
        errs = [f["sigma2_rel_err"] for f in fits]
        worst = max((r for r in noise_rows if r["gamma_nominal"] == gamma),
                    key=lambda r: r["sigma2_rel_err_max"])
        by_gamma[str(gamma)] = {
            "fits": len(fits), "shapes": sum(r["gamma_nominal"] == gamma for r in noise_rows),
            "sigma2_rel_err_median": statistics.median(errs), "sigma2_rel_err_max": max(errs),
            "worst_shape": worst["shape"],
            "sigma_plus_rel_err_max": max(f["sigma_plus_rel_err"] for f in fits),
            "false_positive_fits": sum(f["spikes"] > 0 for f in fits),
        }
    all_fits = [f for r in noise_rows for f in r["per_fit"]]
    orientation = {}
    for name in ("rows<cols", "rows>cols", "square"):
        errs = [f["sigma2_rel_err"] for r in noise_rows if r["orientation"] == name for f in r["per_fit"]]
        if errs:
            orientation[name] = {"sigma2_rel_err_median": statistics.median(errs),
                                 "sigma2_rel_err_max": max(errs)}

    def spike_group(rows: list[dict[str, Any]]) -> dict[str, Any]:
        reps = sum(r["reps"] for r in rows)
        exact = sum(r["exact"] for r in rows)
        return {"cases": reps, "exact": exact, "exact_rate": exact / reps if reps else None,
                "under": sum(f < r["k"] for r in rows for f in r["found"]),
                "over": sum(f > r["k"] for r in rows for f in r["found"]),
                "found_total": sum(sum(r["found"]) for r in rows),
                "planted_total": sum(r["k"] * r["reps"] for r in rows),
                "sigma2_rel_err_median": statistics.median(r["sigma2_rel_err_median"] for r in rows)
                if rows else None,
                "sigma2_rel_err_max": max((r["sigma2_rel_err_max"] for r in rows), default=None)}

    well = [r for r in spike_rows if r["regime"] == "well_above"]
    near = [r for r in spike_rows if r["regime"] == "near_threshold"]
    spikes = {"well_above": spike_group(well),
              "well_above_by_k": {str(k): spike_group([r for r in well if r["k"] == k]) for k in RANKS},
              "near_threshold": spike_group(near),
              "near_threshold_expected_detectable": spike_group([r for r in near if r["expected_detectable"]]),
              "near_threshold_expected_missed": spike_group([r for r in near if not r["expected_detectable"]])}
    vit = {f"{t['shape'][0]}x{t['shape'][1]}": {"median_s": t["fit_mp_s_median"], "min_s": t["fit_mp_s_min"]}
           for t in timing}
    return {
        "noise_by_gamma": by_gamma,
        "noise_by_orientation": orientation,
        "noise_false_positive_fits": sum(f["spikes"] > 0 for f in all_fits),
        "noise_fits": len(all_fits),
        "scale_invariance_max_abs_diff": max(r["scale_invariance_max_abs_diff"] for r in noise_rows),
        "spikes": spikes,
        "vit_b_mlp_seconds_per_fit": vit,
    }


# ----------------------------------------------------------------------- output


def _shape(s: list[int]) -> str:
    return f"{s[0]}×{s[1]}"


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = [f"# Marchenko–Pastur fit accuracy ({report['mode']})", "",
             (f"{report['date']} · {report['machine']['cpu_model']} · {report['machine']['cores_usable']} cores · "
              f"`{report['command']}` · mpcompile {report['versions'].get('git_commit', '')} · "
              f"{report['seconds']} s · load {report['loadavg_at_start'][0]:.2f} → "
              f"{report['loadavg_at_end'][0]:.2f}"), "",
             ("`fit_mp` with its defaults (α = 0.25, TW 0.99) on synthetic float32 matrices with known truth. "
              "σ² error = |σ̂²−v|/v; σ+ error against √v(√n+√p); *oracle* = ‖W‖²_F/(pn), the error floor of "
              "an estimator that knows the matrix is pure noise. Spikes: rank-k signal with equal singular "
              "values θ; BBP threshold θc = √v(pn)^¼; *pred* = predicted outlier / σ+, *thr* = spike "
              "threshold with the true σ² / σ+. Seeds fixed (`--seed "
              f"{report['parameters']['seed']}`)."), ""]
    lines += ["## Summary", "",
              "| γ | shapes | fits | σ² err median | σ² err max | worst shape | σ+ err max | false-positive fits |",
              "|---|---|---|---|---|---|---|---|"]
    for gamma, g in s["noise_by_gamma"].items():
        lines.append(f"| {gamma} | {g['shapes']} | {g['fits']} | {g['sigma2_rel_err_median']:.2e} | "
                     f"{g['sigma2_rel_err_max']:.2e} | {_shape(g['worst_shape'])} | "
                     f"{g['sigma_plus_rel_err_max']:.2e} | {g['false_positive_fits']} |")
    lines.append("")
    for name, o in s["noise_by_orientation"].items():
        lines.append(f"- {name}: σ² err median {o['sigma2_rel_err_median']:.2e}, max {o['sigma2_rel_err_max']:.2e}")
    lines.append(f"- pure noise: {s['noise_false_positive_fits']}/{s['noise_fits']} fits reported ≥ 1 spike; "
                 f"scale equivariance (v = 0.02² vs 1, same draw): max |Δ rel err| = "
                 f"{s['scale_invariance_max_abs_diff']:.1e}")
    w, n = s["spikes"]["well_above"], s["spikes"]["near_threshold"]
    lines.append(f"- planted spikes well above threshold: exact count in {w['exact']}/{w['cases']} fits "
                 f"({100 * w['exact_rate']:.1f} %; {w['under']} under, {w['over']} over), σ² err median "
                 f"{w['sigma2_rel_err_median']:.2e}, max {w['sigma2_rel_err_max']:.2e}")
    for k, g in s["spikes"]["well_above_by_k"].items():
        lines.append(f"  - k = {k}: {g['exact']}/{g['cases']} exact, σ² err max {g['sigma2_rel_err_max']:.2e}")
    lines.append(f"- near threshold: found {n['found_total']}/{n['planted_total']} planted "
                 f"({n['exact']}/{n['cases']} exact, {n['over']} over-counts)")
    for key, label in (("near_threshold_expected_detectable", "predicted outlier above threshold"),
                       ("near_threshold_expected_missed", "predicted outlier below threshold")):
        g = s["spikes"][key]
        if g["cases"]:
            lines.append(f"  - {label}: found {g['found_total']}/{g['planted_total']}, "
                         f"{g['exact']}/{g['cases']} exact")
    for shape, sec in s["vit_b_mlp_seconds_per_fit"].items():
        lines.append(f"- ViT-B MLP {shape}: {sec['median_s'] * 1e3:.1f} ms per `fit_mp` "
                     f"(median; min {sec['min_s'] * 1e3:.1f} ms)")
    lines += ["", "## Pure noise, per shape", "",
              "| shape | γ | fits | σ² err median | σ² err max | σ² signed median | oracle err median | "
              "σ+ err max | s_max / σ+ theory (max) | FP fits | ms / fit (median, min) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["noise"]:
        lines.append(f"| {_shape(r['shape'])} | {r['gamma']:.3f} | {r['fits']} | {r['sigma2_rel_err_median']:.2e} | "
                     f"{r['sigma2_rel_err_max']:.2e} | {r['sigma2_signed_rel_err_median']:+.2e} | "
                     f"{r['oracle_rel_err_median']:.2e} | "
                     f"{r['sigma_plus_rel_err_max']:.2e} | {r['top_over_theory_edge_max']:.3f} | "
                     f"{r['false_positive_fits']} | {r['seconds_per_fit_median'] * 1e3:.1f}, "
                     f"{r['seconds_per_fit_min'] * 1e3:.1f} |")
    lines += ["", "## Planted spikes (v = 0.02²)", "",
              "| shape | k | θ | θ/θc | pred | thr | found per seed | exact | smallest planted s / σ+ | "
              "σ² signed median | σ² err max |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["spikes"]:
        regime = "" if r["regime"] == "well_above" else " (near)"
        smallest = ", ".join(f"{x:.3f}" for x in r["smallest_planted_observed_over_edge"])
        lines.append(f"| {_shape(r['shape'])} | {r['k']} | {r['strength']}{regime} | {r['theta_over_bbp']:.2f} | "
                     f"{r['predicted_outlier_over_edge']:.3f} | {r['theory_threshold_over_edge']:.3f} | "
                     f"{', '.join(map(str, r['found']))} | {r['exact']}/{r['reps']} | {smallest} | "
                     f"{r['sigma2_signed_rel_err_median']:+.2e} | {r['sigma2_rel_err_max']:.2e} |")
    lines += ["", "## Timing (ViT-B MLP shapes, float32)", "",
              "| shape | repeats | fit_mp median ms | min ms | Gram + eigvalsh ms | fit from eigenvalues µs |",
              "|---|---|---|---|---|---|"]
    for t in report["timing"]:
        lines.append(f"| {_shape(t['shape'])} | {t['repeats']} | {t['fit_mp_s_median'] * 1e3:.1f} | "
                     f"{t['fit_mp_s_min'] * 1e3:.1f} | {t['eigenvalues_s_median'] * 1e3:.1f} | "
                     f"{t['fit_from_eigenvalues_s_median'] * 1e6:.0f} |")
    return "\n".join(lines)


def print_summary(report: dict[str, Any]) -> None:
    s = report["summary"]
    print(f"\nmp_fit_accuracy ({report['mode']}): {report['machine']['cpu_model']}, "
          f"{report['machine']['cores_usable']} cores; {report['seconds']} s; load "
          f"{report['loadavg_at_start'][0]:.2f} → {report['loadavg_at_end'][0]:.2f}")
    print(f"{'γ':>6}{'fits':>6}{'σ² err median':>15}{'σ² err max':>12}{'FP fits':>9}")
    for gamma, g in s["noise_by_gamma"].items():
        print(f"{gamma:>6}{g['fits']:>6}{g['sigma2_rel_err_median']:>15.2e}{g['sigma2_rel_err_max']:>12.2e}"
              f"{g['false_positive_fits']:>9}")
    w, n = s["spikes"]["well_above"], s["spikes"]["near_threshold"]
    print(f"spikes well above threshold: {w['exact']}/{w['cases']} exact ({100 * w['exact_rate']:.1f} %); "
          f"near threshold: found {n['found_total']}/{n['planted_total']}")
    for shape, sec in s["vit_b_mlp_seconds_per_fit"].items():
        print(f"ViT-B MLP {shape}: {sec['median_s'] * 1e3:.1f} ms per fit_mp (min {sec['min_s'] * 1e3:.1f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small subset (< 30 s on 2 cores)")
    parser.add_argument("--seed", type=int, default=0, help="base seed of every generated matrix")
    parser.add_argument("--seeds", type=int, help="noise draws per shape (default 4, quick 2)")
    parser.add_argument("--spike-seeds", type=int, help="draws per spike case (default 3, quick 2)")
    parser.add_argument("--timing-repeats", type=int, help="repeats of the ViT timing (default 7, quick 3)")
    parser.add_argument("-o", "--output", type=Path,
                        help="JSON path (default benchmarks/results/mp_fit_accuracy[_quick].json); "
                             "the Markdown goes next to it")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or (2 if args.quick else 4)
    args.spike_seeds = args.spike_seeds or (2 if args.quick else 3)
    args.timing_repeats = args.timing_repeats or (3 if args.quick else 7)

    t0 = time.perf_counter()
    load_start = list(os.getloadavg())
    print("pure noise:", flush=True)
    noise_rows = run_noise(args)
    print("planted spikes:", flush=True)
    spike_rows = run_spikes(args)
    print("timing:", flush=True)
    timing = time_vit(args)
    report = {
        **run_header("mp_fit_accuracy", args.quick),
        "loadavg_at_start": load_start,
        "parameters": {"seed": args.seed, "noise_seeds": args.seeds, "spike_seeds": args.spike_seeds,
                       "timing_repeats": args.timing_repeats, "variances": list(VARIANCES),
                       "spike_variance": SPIKE_VARIANCE, "ranks": list(RANKS),
                       "strengths": [list(x) for x in STRENGTHS], "alpha": 0.25,
                       "tw_confidence": TW_CONFIDENCE, "dtype": "float32"},
        "summary": summarize(noise_rows, spike_rows, timing),
        "noise": noise_rows,
        "spikes": spike_rows,
        "timing": timing,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print_summary(report)
    stem = "mp_fit_accuracy_quick" if args.quick else "mp_fit_accuracy"
    out = args.output or RESULTS_DIR / f"{stem}.json"
    save_results(report, out, markdown(report))
    print(f"\nsaved {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
