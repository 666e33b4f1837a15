"""The report of ``equal_bytes.py``: accuracy per configuration at equal bytes, from ``equal_bytes.csv`` only."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driver import read_rows, stored_args
from report import document, markdown_table, plot

DATASETS = ("mnist5k", "cifar10")


@dataclass(frozen=True)
class Config:
    overrides: tuple[str, ...]
    sends: str  # payload per worker and step, d' floating values, P workers


CONFIGS = {
    "lsgd": Config(("strategy=lsgd", "strategy.tau=16"), "(4·d' + 4·P)/16: the leader's weights"),
    "easgd": Config(("strategy=easgd", "strategy.tau=16"), "4·d'/16: the elastic differences"),
    "diloco": Config(("strategy=diloco", "strategy.tau=16"), "4·d'/16: the pseudo-gradients"),
    "diloco_avg": Config(
        (
            "strategy=diloco",
            "strategy.tau=16",
            "strategy.outer_lr=1.0",
            "strategy.outer_momentum=0.0",
            "strategy.nesterov=false",
        ),
        "4·d'/16: DiLoCo with outer SGD lr 1, no momentum: θ = the workers' mean (periodic averaging)",
    ),
    "streaming_diloco": Config(
        ("strategy=streaming_diloco", "strategy.tau=16", "strategy.fragments=4", "strategy.overlap_steps=1"),
        "P·(1 + 4/64)·d'/16: the all-gathered 8-bit codes and scales of one fragment per 4 steps",
    ),
}


@dataclass
class Row:
    """One run (a row of equal_bytes.csv)."""

    dataset: str
    config: str
    seed: int
    test_acc: float  # of the strategy's evaluation model, whole test split
    steps: int  # optimizer steps per worker
    bytes_per_step: float  # rank 0's payload per step
    fit_s: float
    diverged: bool = False  # every worker diverged: the app stopped the run at ``steps``


def _section(dataset: str, rows: list[Row], configs: list[str]) -> str:
    table = []
    reference = [r.bytes_per_step for r in rows if r.config in ("diloco", "diloco_avg") and r.bytes_per_step > 0]
    for name in configs:
        runs = [r for r in rows if r.config == name]
        if not runs:
            continue
        finished = [r for r in runs if not r.diverged]
        acc = [r.test_acc * 100 for r in finished]
        diverged = [f"{r.seed} (step {r.steps})" for r in runs if r.diverged]
        count = f"{len(runs)}" + (f", diverged: seed {', '.join(diverged)}" if diverged else "")
        payload = statistics.mean(r.bytes_per_step for r in finished) if finished else math.nan
        relative = f"{payload / statistics.mean(reference):.3f}" if reference and finished else "-"
        table.append(
            [
                name,
                CONFIGS[name].sends if name in CONFIGS else "-",
                count,
                "/".join(sorted({str(r.steps) for r in finished})) or "-",
                f"{statistics.mean(acc):.2f}" if acc else "-",
                f"{min(acc):.2f} - {max(acc):.2f}" if acc else "-",
                f"{statistics.stdev(acc):.2f}" if len(acc) > 1 else "-",
                f"{payload:,.0f}" if finished else "-",
                relative,
            ]
        )
    header = ["configuration", "sends per step", "runs", "steps/worker", "test acc % (mean)", "min - max", "std"]
    header += ["payload bytes/step/worker", "bytes vs diloco"]  # statistics over the runs that finished
    return f"### {dataset}\n\n" + markdown_table(header, table)


def _draw(axes: Any, rows: list[Row], datasets: list[str], configs: list[str]) -> None:
    for axis, dataset in zip(axes[0], datasets):
        for x, name in enumerate(configs):
            acc = [r.test_acc * 100 for r in rows if r.dataset == dataset and r.config == name and not r.diverged]
            if acc:
                axis.scatter([x] * len(acc), acc, color="tab:blue", s=14)
                axis.hlines(statistics.mean(acc), x - 0.3, x + 0.3, color="black")
        axis.set_xticks(range(len(configs)), configs, rotation=20, fontsize=8)
        axis.set_ylabel("test accuracy (%)")
        axis.set_title(f"{dataset}: every seed (dots) and the mean (bar)", fontsize=9)
        axis.grid(alpha=0.3)


def report(folder: Path, meta: dict[str, Any]) -> str:
    """equal_bytes.md's text; writes equal_bytes.png."""
    args = stored_args(meta)
    rows = read_rows(folder / "equal_bytes.csv", Row)
    datasets = [d for d in args.datasets if any(r.dataset == d for r in rows)]
    sections = [_section(d, [r for r in rows if r.dataset == d], args.configs) for d in datasets]
    plot(
        folder / "equal_bytes.png",
        lambda axes: _draw(axes, rows, datasets, args.configs),
        1,
        len(datasets),
        (5.5 * len(datasets), 3.6),
    )
    settings = (
        f"- settings: {args.workers} CPU worker processes, seeds {', '.join(map(str, args.seeds))}; mnist5k: CNN7, "
        f"batch 32 per worker, {args.mnist_epochs} epochs; cifar10: {args.train_per_class} training / "
        f"{args.test_per_class} test images per class, the `experiment=cifar10_cnn7` preset (batch 128 per worker), "
        f"{args.cifar_steps} steps per worker, no LR drop; the app's Nesterov SGD (lr 0.05) as every "
        "worker's (DiLoCo: inner) optimizer; evaluated model: the app's defaults (LSGD the leader, EASGD the centre, "
        "DiLoCo the global model)\n"
        + "".join(f"- {name}: `{' '.join(changes)}`\n" for name, changes in meta["overrides"].items())
        + "\n"
    )
    title = "Accuracy at equal communication: LSGD, EASGD, DiLoCo, Streaming DiLoCo"
    return document(title, meta, settings, sections, "")
