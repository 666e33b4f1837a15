"""straggler.md and straggler.png from straggler.csv and meta.json: what ``benchmarks/straggler.py`` measured.

Also what both sides share: the configurations and their labels, the stored row, the learning-rate exception.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driver import read_rows, stored_args
from report import Target, bars, document, markdown_table, plot, verdict_table

STRATEGIES = ("lsgd", "lsgd_async", "easgd_async", "downpour", "dpsgd", "adpsgd")  # the app's strategy configs
PERIODIC = ("lsgd", "lsgd_async", "easgd_async", "downpour")  # those with a period tau (the others: every step)
KEEP_RATE = 0.9  # with one slow worker, the fast workers keep at least this share of their step rate
# Strategies that train with the app's learning rate divided by P, and why (said in the report).
LR_OVER_P = {
    "downpour": "DOWNPOUR adds up the P workers' updates on the held parameters; with the app's lr 0.05 they "
    "diverged in every trial run here (test accuracy 10%), with 0.05 / P they train"
}
METHOD = (
    "- rates: optimizer steps per second of each rank, from the end of the warm-up to the end of its own last step; "
    "fast workers = ranks 0..P-2 (mean). Ratios: each with-straggler run over the run without it in the same repeat "
    "(median over repeats). Compute ms/step: forward+backward per step (median per rank), which shows whether the "
    "fast workers' CPU share changed (other processes, or a sleeping straggler when there are more workers than "
    'cores or vCPUs share a physical core); "at equal compute speed": each ratio times the fast workers\' compute '
    "time with / without the straggler, which takes that change out\n"
    "- fit wall time: rank 0's `trainer.fit`. Every rank takes the same number of steps and the asynchronous "
    "strategies meet at the end of training, so the fit still ends when the straggler finishes, whatever the "
    "strategy (expected; see `strategies/_asynchronous.py`)\n"
    "- test accuracy: the strategy's final model (final_sync=True: LSGD's leader, EASGD's centre, DOWNPOUR's held "
    "parameters, D-PSGD's and AD-PSGD's workers' average) on the whole test split;"
    " weight spread: largest difference between the ranks' weights after fit "
    "(0: every rank holds that model)\n\n"
)


@dataclass(frozen=True)
class Config:
    strategy: str
    straggler: bool

    @property
    def label(self) -> str:
        return f"{self.strategy}{' + straggler' if self.straggler else ''}"


@dataclass
class Row:
    """One rank of one run."""

    workers: int
    strategy: str
    straggler: bool
    repeat: int
    rank: int
    slowed: bool  # this rank is the straggler of this run
    steps: int  # optimizer steps this rank took
    steps_per_s: float  # over the timed window (end of warm-up to the end of its own last step)
    compute_ms: float  # median forward+backward time of its steps
    slept_s: float  # the straggler's total sleep
    fit_s: float  # this rank's trainer.fit wall time
    test_acc: float  # the final model (the strategy's reference) on the test split; rank 0 evaluates
    weight_spread: float  # max |w_rank - w_rank0| over all ranks: 0 when final_sync left every rank the same model


@dataclass
class RunSummary:
    """One run (all its ranks), or the medians over repeats of one configuration's runs."""

    fast: float  # fast workers' (ranks 0..P-2) mean steps/s
    slow: float  # rank P-1's steps/s
    fast_compute_ms: float  # fast workers' mean of their median forward+backward time per step
    fit_s: float  # rank 0's trainer.fit
    acc: float
    spread: float  # largest over the ranks (and repeats)
    steps: int
    repeats: int = 1

    @classmethod
    def of_run(cls, ranks: list[Row]) -> RunSummary:
        ranks = sorted(ranks, key=lambda r: r.rank)
        return cls(
            fast=statistics.mean(r.steps_per_s for r in ranks[:-1]),
            slow=ranks[-1].steps_per_s,
            fast_compute_ms=statistics.mean(r.compute_ms for r in ranks[:-1]),
            fit_s=ranks[0].fit_s,
            acc=ranks[0].test_acc,
            spread=max(r.weight_spread for r in ranks),
            steps=ranks[0].steps,
        )

    @classmethod
    def of_repeats(cls, runs: list[RunSummary]) -> RunSummary:
        def median(name: str) -> float:
            return statistics.median(getattr(run, name) for run in runs)

        return cls(
            *(median(name) for name in ("fast", "slow", "fast_compute_ms", "fit_s", "acc")),
            spread=max(run.spread for run in runs),
            steps=int(median("steps")),
            repeats=len(runs),
        )


class Runs:
    """The runs of one worker count P by (strategy, straggler) and repeat, and their medians."""

    def __init__(self, rows: list[Row]) -> None:
        ranks: dict[tuple[str, bool, int], list[Row]] = defaultdict(list)
        for row in rows:
            ranks[(row.strategy, row.straggler, row.repeat)].append(row)
        self.by_repeat: dict[tuple[str, bool], dict[int, RunSummary]] = defaultdict(dict)
        for (strategy, straggler, repeat), run in ranks.items():
            self.by_repeat[(strategy, straggler)][repeat] = RunSummary.of_run(run)
        self.median = {key: RunSummary.of_repeats(list(runs.values())) for key, runs in self.by_repeat.items()}

    def paired(self, strategy: str, name: str) -> list[float]:
        """Per-repeat ratios, run with the straggler over the run without it, of the RunSummary field ``name``."""
        without, with_ = self.by_repeat.get((strategy, False), {}), self.by_repeat.get((strategy, True), {})
        return [getattr(with_[k], name) / getattr(without[k], name) for k in sorted(without) if k in with_]

    def equal_compute(self, strategy: str) -> list[float]:
        """Per-repeat fast-rate ratios times the fast workers' compute-time ratio (with / without the straggler).

        A sleeping straggler can leave the fast workers more CPU (more workers than cores, other processes, or vCPUs
        that share a physical core), which makes their forward+backward faster; this factor takes that speed-up out.
        """
        rates, computes = self.paired(strategy, "fast"), self.paired(strategy, "fast_compute_ms")
        return [rate * compute for rate, compute in zip(rates, computes)]

    def accuracies(self, strategy: str, straggler: bool) -> str:
        runs = self.by_repeat.get((strategy, straggler), {})
        return " / ".join(f"{runs[k].acc * 100:.1f}" for k in sorted(runs))


def report(folder: Path, meta: dict[str, Any]) -> str:
    """straggler.md's text (tables, verdicts, how it was run); writes straggler.png."""
    args = stored_args(meta)
    rows = read_rows(folder / "straggler.csv", Row)
    sections, verdicts, plotted = [], [], {}
    for p in args.workers:
        runs = Runs([row for row in rows if row.workers == p])
        present = [s for s in args.strategies if (s, False) in runs.median and (s, True) in runs.median]
        if present:
            sections.append(_section(p, present, runs, args, meta["cores"]))
            verdicts += _verdicts(p, present, runs, args.slowdown)
            medians = {s: (runs.median[(s, False)], runs.median[(s, True)]) for s in present}
            plotted[f"P = {p}"] = {s: (*medians[s], runs.paired(s, "fast")) for s in present}
    plot(folder / "straggler.png", lambda axes: _draw(axes, plotted), len(plotted), 2, (12, 3.4 * len(plotted)))
    title = "One slow worker: synchronous against asynchronous strategies"
    return document(title, meta, _settings(args), sections, "### Verdicts\n\n" + verdict_table(verdicts))


def _settings(args: argparse.Namespace) -> str:
    return (
        f"- settings: CNN7 on mnist5k (4,000 train / 1,000 test digits), batch 32 per worker, {args.epochs} epoch(s)"
        + (f" of {args.batches} batches" if args.batches else "")
        + f", tau={args.tau}, {args.repeats} repeat(s), step rate timed from the end of step {args.warmup}, "
        f"{args.threads} CPU threads shared by the P workers (max(1, threads // P) each), seed {args.seed} + repeat\n"
        "- optimizer: the app's SGD (lr 0.05, Nesterov momentum 0.9, weight decay 1e-4, LR drop at epoch 7)"
        + "".join(f"; {name} with lr 0.05 / P ({why})" for name, why in LR_OVER_P.items() if name in args.strategies)
        + f"\n- straggler: rank P-1 sleeps ({args.slowdown:g} - 1) x its own forward+backward time after every step\n"
        + METHOD
    )


def _section(p: int, present: list[str], runs: Runs, args: argparse.Namespace, cores: int) -> str:
    """The three tables of one worker count: per configuration, ratios with / without, accuracies."""
    configs, ratios, accs = [], [], []
    for strategy in present:
        for straggler in (False, True):
            s = runs.median[(strategy, straggler)]
            configs.append(
                [Config(strategy, straggler).label, f"{s.fast:.2f}", f"{s.slow:.2f}", f"{s.fast_compute_ms:.1f}"]
                + [f"{s.fit_s:.1f}", f"{s.acc * 100:.2f}", f"{s.spread:.1e}", s.steps, s.repeats]
            )
        base, slow = runs.median[(strategy, False)], runs.median[(strategy, True)]
        fast = runs.paired(strategy, "fast")
        ratios.append(
            [strategy, f"{statistics.median(fast):.3f}", f"{min(fast):.2f}-{max(fast):.2f}"]
            + [f"{statistics.median(runs.equal_compute(strategy)):.3f}"]
            + [f"{statistics.median(runs.paired(strategy, 'slow')):.3f}", f"{slow.fast / slow.slow:.2f}"]
            + [f"{statistics.median(runs.paired(strategy, 'fit_s')):.2f}"]
        )
        accs.append(
            [strategy, f"{base.acc * 100:.2f}", runs.accuracies(strategy, False), f"{slow.acc * 100:.2f}"]
            + [runs.accuracies(strategy, True)]
        )
    oversubscribed = (
        f" **{p} workers on {cores} cores: the straggler's sleep frees CPU for the others, which inflates their "
        "rate with a straggler.**"
        if p > cores
        else ""
    )
    last = f"rank {p - 1}"
    config_header = ["configuration", "fast workers steps/s", f"{last} steps/s", "fast workers' compute ms/step"]
    config_header += ["fit wall s", "test acc %", "weight spread", "steps/worker", "repeats"]
    ratio_header = ["strategy", "fast workers' rate: with / without straggler (median)", "per-repeat range"]
    ratio_header += ["the same at equal compute speed (median)", f"{last}'s rate: with / without"]
    ratio_header += ["fast / straggler rate (with)", "fit wall: with / without"]
    acc_header = ["strategy", "test acc % without straggler", "per repeat", "test acc % with straggler", "per repeat"]
    return (
        f"### P = {p} workers, {last} slowed down {args.slowdown:g}x{oversubscribed}\n\n"
        + markdown_table(config_header, configs)
        + "\n"
        + markdown_table(ratio_header, ratios)
        + "\n"
        + markdown_table(acc_header, accs)
    )


def _verdicts(p: int, present: list[str], runs: Runs, slowdown: float) -> list[list[str]]:
    rows = []
    if "lsgd_async" in present:
        ratio = statistics.median(runs.paired("lsgd_async", "fast"))
        fair = statistics.median(runs.equal_compute("lsgd_async"))
        what = f"fast workers' rate with a {slowdown:g}x straggler >= {KEEP_RATE}x of without"
        target = Target(what, KEEP_RATE, at_least=True)
        rows.append(target.row(f"P={p}: lsgd_async", ratio, f"{ratio:.3f}x ({fair:.3f}x at equal compute speed)"))
    if "lsgd" in present:
        ratio = statistics.median(runs.paired("lsgd", "fast"))
        slow, base = runs.median[("lsgd", True)], runs.median[("lsgd", False)]
        pace = slow.slow / base.fast  # the straggler's pace relative to the fast workers' undisturbed rate
        measured = f"{ratio:.3f}x of without (the straggler runs at {pace:.3f}x; fast / straggler = "
        measured += f"{slow.fast / slow.slow:.2f})"
        # "toward the straggler's pace": closer to the straggler's rate than to the undisturbed one
        shown = "shown" if ratio < (1 + pace) / 2 else "not shown"
        rows.append([f"P={p}: lsgd: fast workers' rate drops toward the straggler's pace", measured, shown])
    if "adpsgd" in present:
        rows.append(_adpsgd_verdict(p, present, runs, slowdown))
    accs = ", ".join(
        f"{s} {runs.median[(s, False)].acc * 100:.2f} / {runs.median[(s, True)].acc * 100:.2f}" for s in present
    )
    rows.append([f"P={p}: final test accuracy % (without / with straggler)", accs, "reported"])
    spread = max(runs.median[(s, k)].spread for s in present for k in (False, True))
    target = Target("every rank holds the final model after fit (final_sync)", 0.0)
    rows.append(target.row(f"P={p}", spread, f"max weight spread {spread:.1e}", ("yes", "NO")))
    return rows


def _adpsgd_verdict(p: int, present: list[str], runs: Runs, slowdown: float) -> list[str]:
    """AD-PSGD's fast workers' rate with the straggler (over without), beside D-PSGD's and LSGD's when measured.

    The straggler is rank P-1, a passive worker (odd rank): an active worker that drew it waits for its next step
    boundary, nobody else does; with P = 2 it is the only partner of the only active worker."""
    shown = [s for s in ("adpsgd", "dpsgd", "lsgd") if s in present]
    ratios = [f"{s} {statistics.median(runs.paired(s, 'fast')):.3f}x" for s in shown]
    note = " (P = 2: the straggler is the active worker's only partner)" if p == 2 else ""
    what = f"P={p}: adpsgd: fast workers' rate with a {slowdown:g}x straggler, over without{note}"
    return [what, ", ".join(ratios), "reported"]


COLORS = {
    "lsgd": "tab:green",
    "lsgd_async": "tab:blue",
    "easgd_async": "tab:orange",
    "downpour": "tab:purple",
    "dpsgd": "tab:brown",
    "adpsgd": "tab:cyan",
}


def _draw(axes: Any, plotted: dict[str, dict[str, tuple[RunSummary, RunSummary, list[float]]]]) -> None:
    """Per worker count: step rates (no straggler, straggler, the straggler itself) and final test accuracy."""
    width = 0.27
    for (rates, accs), (title, entry) in zip(axes, plotted.items()):
        labels = list(entry)
        colors = [COLORS.get(s, "tab:red") for s in labels]
        base = [entry[s][0].fast for s in labels]
        fast, slow = [entry[s][1].fast for s in labels], [entry[s][1].slow for s in labels]
        hatched = {"color": "white", "edgecolor": "black", "hatch": "//", "label": "the straggler"}
        series = [(base, {"color": "tab:gray", "label": "fast workers, no straggler"})]
        series += [(fast, {"color": colors, "label": "fast workers, straggler"}), (slow, hatched)]
        xs = bars(rates, labels, series, width)
        for x, s in zip(xs, labels):
            rates.text(x, fast[x], f"{statistics.median(entry[s][2]):.2f}x", ha="center", va="bottom", fontsize=8)
        rates.set_ylabel("optimizer steps/s per worker")
        rates.set_title(f"{title}: step rates (medians; label: fast with / without)", fontsize=9)
        rates.set_ylim(0, max(base + fast + slow) * 1.35)
        rates.legend(fontsize=7, loc="upper center", ncol=3)
        without, with_ = [entry[s][0].acc * 100 for s in labels], [entry[s][1].acc * 100 for s in labels]
        bars(accs, labels, [(without, {"color": "tab:gray"}), (with_, {"color": colors})], width)
        accs.set_ylim(max(0.0, min(without + with_) - 5), 100)
        accs.set_ylabel("test accuracy %")
        accs.set_title(f"{title}: final test accuracy (gray: no straggler)", fontsize=9)
