"""katyusha.md and katyusha.png from katyusha.csv, katyusha_curves.csv and meta.json: what
``benchmarks/katyusha.py`` measured.

Also what both sides share: the methods and their labels, the stored rows (passes to each target; the chosen
settings' curves), and how the report reads ``meta.json``'s problem statistics and real run.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from driver import read_rows, stored_args
from report import document, markdown_table, plot, verdict_table

LABELS = {
    "sgd": "SGD",
    "svrg": "SVRG",
    "katyusha_x": "Katyusha X (τ tuned)",
    "katyusha_x_theory": "Katyusha X (τ theory)",
}
VARIANTS = ("katyusha_x", "katyusha_x_theory")  # compared with SVRG
COLORS = ("tab:gray", "tab:blue", "tab:red", "tab:orange")  # in LABELS' order
STYLES = ("-", "--", ":")  # in --workers order (the plot draws the first three worker counts)
MATCH = 1e-9  # the real run matches the simulator when ‖x_real − x_sim‖/‖x_sim‖ is below this (float64)


@dataclass
class Row:
    """Passes of one method at one worker count P to one target, with its best setting (see katyusha.py)."""

    gap: float
    method: str  # a key of LABELS
    workers: int
    target: float  # relative suboptimality (f(x) − f*)/(f(x_0) − f*)
    passes: float  # mean over the seeds of the passes from which every seed stays below the target (inf: never)
    per_worker: float  # passes / P: parallel rounds
    speedup: float  # P · passes(P=1) / passes(P)
    lr: float
    lr_times_L: float
    tau: float | None  # Katyusha X only (empty in the CSV otherwise)


@dataclass
class Point:
    """One evaluation of a chosen setting (the best at the smallest target): geometric mean over the seeds."""

    gap: float
    method: str
    workers: int
    passes: float
    suboptimality: float


def read_passes(folder: Path) -> list[Row]:
    """katyusha.csv's rows; ``tau`` as a float, or ``None`` where the CSV leaves it empty."""
    rows = read_rows(folder / "katyusha.csv", Row)  # an optional column comes back as its text
    return [replace(row, tau=float(row.tau) if row.tau not in (None, "") else None) for row in rows]


def report(folder: Path, meta: dict[str, Any]) -> str:
    """katyusha.md's text (protocol, one table per gap, the real run, verdicts); writes katyusha.png."""
    args = stored_args(meta)
    rows = read_passes(folder)
    curves = read_rows(folder / "katyusha_curves.csv", Point)
    problems = {float(s["gap"]): s for s in meta["problem"]}
    sections = [_gap_section(gap, problems[gap], rows, args) for gap in args.gaps]
    verdicts = [line for gap in args.gaps for line in _verdicts(gap, rows, args)]
    real = meta.get("real_run")
    if real:
        sections.append(_real_section(real, args))
        verdicts += _real_verdicts(real, args)
    plot(
        folder / "katyusha.png",
        lambda axes: _draw(axes, rows, curves, args),
        len(args.gaps),
        2,
        (11, 4 * len(args.gaps)),
    )
    title = "Katyusha X, SVRG and SGD on a sum of non-convex functions"
    return document(title, meta, _settings(args), sections, "### Verdicts\n\n" + verdict_table(verdicts))


def _settings(args: argparse.Namespace) -> str:
    return (
        f"\nProtocol: step sizes η = c / L for c in {args.lr_grid} (L = max component smoothness), the same grid "
        f'for every method; Katyusha X also τ in {args.tau_grid} ("τ tuned") or τ = √(mησ)/2 ("τ theory"); '
        f"{args.seeds} seeds (data orders); per (method, P, target) the setting with the lowest mean passes over "
        f"the seeds, every seed below the target from then on to the end of its run (at most {args.max_passes:g} "
        f"passes; runs stop when every setting is below the last target). b = {args.batch} samples "
        "per worker and step; epoch m = one pass over the shard (n / (P·b) steps). Passes = component gradients / n: "
        "SGD P·b per step, SVRG and Katyusha X 2·P·b per step plus n per epoch. Suboptimality measured every m/8 "
        'steps; "passes to t" is where the suboptimality falls below t for good. '
        "Speed-up = P · passes(1) / passes(P) (parallel rounds).\n\n"
    )


def _gap_section(gap: float, s: dict[str, Any], rows: list[Row], args: argparse.Namespace) -> str:
    """One gap's problem and its table: passes to every target, per method and worker count."""
    last_target = min(args.targets)
    header = ["method", "P", *(f"passes to {t:g}" for t in args.targets)]
    header += [f"per-worker passes / speed-up at {last_target:g}", f"η·L, τ at {last_target:g}"]
    table = []
    for method in LABELS:
        for workers in args.workers:
            mine = {r.target: r for r in rows if (r.gap, r.method, r.workers) == (gap, method, workers)}
            last = mine[last_target]
            reached = math.isfinite(last.passes)
            cells = [f"{mine[t].passes:.1f}" if math.isfinite(mine[t].passes) else "not reached" for t in args.targets]
            speed = f"{last.per_worker:.1f} / {last.speedup:.2f}x" if reached else "-"
            setting = f"{last.lr_times_L:g}, {'-' if last.tau is None else format(last.tau, '.3g')}"
            table.append([LABELS[method], workers, *cells, speed, setting if reached else "-"])
    return (
        f"### gap {gap:g}: n = {s['n']}, d = {s['d']}, λ = {s['lambda']:.4f}, σ = {s['sigma']:.4g}, "
        f"L = {s['L_components']:.2f}, L(f) = {s['L_average']:.3f}, κ = L/σ = {s['kappa']:.0f}, "
        f"non-convex components {100 * s['nonconvex_fraction']:.0f}%\n\n" + markdown_table(header, table)
    )


def _pairs(gap: float, method: str, rows: list[Row]) -> list[tuple[int, float, float, float]]:
    """(P, target, Katyusha X passes, SVRG passes) where either reached the target."""
    svrg = {(r.workers, r.target): r.passes for r in rows if (r.gap, r.method) == (gap, "svrg")}
    mine = [r for r in rows if (r.gap, r.method) == (gap, method)]
    pairs = [(r.workers, r.target, r.passes, svrg[(r.workers, r.target)]) for r in mine]
    return [p for p in pairs if math.isfinite(p[2]) or math.isfinite(p[3])]


def _verdicts(gap: float, rows: list[Row], args: argparse.Namespace) -> list[list[str]]:
    """Per Katyusha X variant: fewer passes than SVRG to the smallest target at every P; no more passes than SVRG in
    any (P, target) pair (the two coincide where a target is reached within the first epoch); speed-ups."""
    last_target, lines = min(args.targets), []
    for method in VARIANTS:
        pairs = _pairs(gap, method, rows)
        at_last = [(p, kx, svrg) for p, t, kx, svrg in pairs if t == last_target]
        measured = ", ".join(f"P={p} {kx:.1f} vs {svrg:.1f}" for p, kx, svrg in at_last)
        ratios = [svrg / kx for _, kx, svrg in at_last]
        if ratios:
            measured += f" (SVRG / Katyusha X {min(ratios):.2f}x-{max(ratios):.2f}x)"
        fewer = bool(at_last) and all(kx < svrg for _, kx, svrg in at_last)
        what = f"gap {gap:g}: {LABELS[method]} needs fewer passes than SVRG to {last_target:g}, at every P"
        lines.append([what, measured or "not reached", _met(fewer)])

        fewer_n = sum(kx < svrg for _, _, kx, svrg in pairs)
        equal_n = sum(kx == svrg for _, _, kx, svrg in pairs)
        more_n = len(pairs) - fewer_n - equal_n
        ratios = [svrg / kx for _, _, kx, svrg in pairs]
        spread = f"{min(ratios):.2f}x-{max(ratios):.2f}x" if ratios else "n/a"
        measured = (
            f"fewer in {fewer_n} of {len(pairs)} (P, target) pairs, as many in {equal_n}, more in {more_n}; "
            f"SVRG passes / Katyusha X passes = {spread}"
        )
        what = f"gap {gap:g}: {LABELS[method]} needs no more passes than SVRG in any (P, target) pair"
        lines.append([what, measured, _met(more_n == 0 and bool(pairs))])
    speedups = []
    for method in ("svrg", *VARIANTS):
        mine = sorted((r.workers, r.speedup) for r in rows if (r.gap, r.method, r.target) == (gap, method, last_target))
        shown = ", ".join(f"P={p} {s:.2f}x" for p, s in mine if p > 1 and math.isfinite(s))
        speedups.append(f"{LABELS[method]} {shown or '-'}")
    what = f"gap {gap:g}: speed-up in parallel rounds to {last_target:g}, P · passes(1) / passes(P)"
    lines.append([what, "; ".join(speedups), "reported"])
    return lines


def _real_ok(real: dict[str, Any]) -> bool:
    return real["relative_difference"] < MATCH and real["steps"] == real["expected_steps"]


def _real_section(real: dict[str, Any], args: argparse.Namespace) -> str:
    return (
        f"### Real run\n\n`KatyushaXStrategy` on {real['workers']} gloo workers (float64), gap {args.gaps[0]:g}, "
        f"η = {real['lr']:.4g}, τ = {real['tau']:.3g}, {real['epochs']} epochs = {real['steps']} steps: "
        f"‖x_real − x_sim‖/‖x_sim‖ = {real['relative_difference']:.1e} ({'matches' if _real_ok(real) else 'DIFFERS'}); "
        f"bytes {real['bytes']:,} (formula 8·d per step + 8·(d+1) per epoch: {real['expected_bytes']:,}).\n"
    )


def _real_verdicts(real: dict[str, Any], args: argparse.Namespace) -> list[list[str]]:
    where = f"real KatyushaXStrategy run, P={real['workers']}, gap {args.gaps[0]:g}"
    iterate = f"‖x_real − x_sim‖/‖x_sim‖ = {real['relative_difference']:.1e}; {real['steps']} of "
    iterate += f"{real['expected_steps']} steps"
    bytes_ = f"{real['bytes']:,} (formula: {real['expected_bytes']:,})"
    exact = real["bytes"] == real["expected_bytes"]
    return [
        [f"{where}: ends at the simulator's iterate (within {MATCH:g}, same steps)", iterate, _met(_real_ok(real))],
        [f"{where}: bytes match 8·d per step + 8·(d+1) per epoch", bytes_, _met(exact)],
    ]


def _met(ok: bool) -> str:
    return "met" if ok else "missed"


def _draw(axes: Any, rows: list[Row], curves: list[Point], args: argparse.Namespace) -> None:
    """Per gap: the chosen settings' curves (left) and passes per worker against P (right), at the last target."""
    last_target = min(args.targets)
    lines: dict[tuple[float, int, str], list[tuple[float, float]]] = defaultdict(list)
    for point in curves:
        lines[(point.gap, point.workers, point.method)].append((point.passes, point.suboptimality))
    for row, gap in zip(axes, args.gaps):
        for method, color in zip(LABELS, COLORS):
            for workers, style in zip(args.workers, STYLES):
                line = lines.get((gap, workers, method))
                if line:
                    row[0].plot(*zip(*line), style, color=color, label=f"{LABELS[method]}, P={workers}")
            mine = {r.workers: r.per_worker for r in rows if (r.gap, r.method, r.target) == (gap, method, last_target)}
            points = [(w, mine[w]) for w in args.workers if math.isfinite(mine[w])]
            if points:
                row[1].plot(*zip(*points), "o-", color=color, label=LABELS[method])
        row[0].set(
            yscale="log",
            xlabel="passes over the data",
            ylabel="(f − f*)/(f(x0) − f*)",
            title=f"gap {gap:g}: best-tuned at {last_target:g}",
            ylim=(last_target / 10, 2),
        )
        row[1].set(
            xlabel="workers P",
            ylabel="passes per worker (parallel rounds)",
            xscale="log",
            yscale="log",
            title=f"to {last_target:g} (linear speed-up: slope -1)",
        )
        row[1].set_xticks(args.workers, [str(w) for w in args.workers], minor=False)
        row[1].minorticks_off()
        row[0].legend(fontsize=7)
        row[1].legend(fontsize=7)
