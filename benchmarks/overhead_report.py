"""overhead.md and overhead.png from overhead.csv and meta.json: what ``benchmarks/overhead.py`` measured.

Also what both sides share: the configurations and their labels, the stored row, and the byte formulas the
measured payloads are checked against (see overhead.py's docstring for the method).
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driver import read_rows, stored_args
from lsgd_lightning.core.fragments import split_tensors
from lsgd_lightning.core.quantize import payload_bytes
from report import Target, bars, document, markdown_table, plot, verdict_table

TOLERANCE = 0.05
LSGD_TARGET = Target("LSGD tau=16 step time within 5% of the no-communication floor", 1 + TOLERANCE)
DATAPARALLEL_TARGET = Target("DataParallel step time within 5% of Lightning's ddp", 1 + TOLERANCE)
BYTES_TARGET = Target("bytes/step match the formulas", 0)  # judged on the number of mismatches
STRATEGIES = ("lsgd", "easgd", "dataparallel", "ddp", "dpsgd", "d2", "adpsgd", "signum", "diloco", "streaming_diloco")
PER_TAU = ("lsgd", "easgd", "diloco", "streaming_diloco")  # one configuration per tau
DPSGD_TOPOLOGIES = ("ring", "exponential")
FORMULAS = (
    "DataParallel and ddp 4·d; EASGD 4·d'/tau; LSGD (4·d' + integer-buffer bytes + 4·P)/tau; D-PSGD ring and D² "
    "(lazy ring) 4·d' per distinct neighbour (8·d', or 4·d' with P = 2); D-PSGD exponential and AD-PSGD 4·d' (one "
    "peer); Signum 4·ceil(d/32) (packed signs)"
)
# Streaming DiLoCo's settings here (fragments and overlap capped by tau: F <= tau, k < tau) and its formula.
STREAMING = {"fragments": 4, "overlap_steps": 1, "quantize_bits": 8, "quantize_block": 64}
DILOCO_FORMULAS = {
    "diloco": "DiLoCo 4·d'/tau (one all-reduce of the pseudo-gradients)",
    "streaming_diloco": (
        f"Streaming DiLoCo P·Σ_f (ceil(d_f·{STREAMING['quantize_bits']}/8) + 4·ceil(d_f/"
        f"{STREAMING['quantize_block']}))/tau over its min({STREAMING['fragments']}, tau) fragments of d_f values "
        "(an all-gather of every worker's int8 codes and float32 block scales: the receive buffer)"
    ),
}
RING_SENDERS = ("dpsgd", "d2")  # send to every ring neighbour (D² always runs on its default lazy ring)

# ImageClassifier's SGD settings where a strategy refuses the default (lr 0.05, Nesterov momentum 0.9), and why.
OPTIMIZERS: dict[str, tuple[dict[str, Any], str]] = {
    "d2": ({"momentum": 0.0, "nesterov": False}, "D² refuses momentum and Nesterov"),
    "signum": ({"nesterov": False, "lr": 1e-3}, "Signum refuses Nesterov; a sign step moves every weight by lr"),
}


@dataclass(frozen=True)
class Config:
    name: str  # floor | lsgd | easgd | dataparallel | ddp | dpsgd | d2 | adpsgd | signum | diloco | streaming_diloco
    tau: int | None = None
    topology: str | None = None  # dpsgd: ring | exponential

    @property
    def optimizer(self) -> dict[str, Any]:
        """ImageClassifier keyword arguments that replace the default SGD settings for this configuration."""
        return OPTIMIZERS.get(self.name, ({}, ""))[0]

    @property
    def streaming(self) -> dict[str, int]:
        """Streaming DiLoCo's settings at this tau."""
        assert self.tau is not None
        capped = {"fragments": min(STREAMING["fragments"], self.tau)}
        capped["overlap_steps"] = min(STREAMING["overlap_steps"], self.tau - 1)
        return {**STREAMING, **capped}

    @property
    def label(self) -> str:
        if self.tau:
            return f"{self.name} tau={self.tau}"
        return f"{self.name} {self.topology}" if self.topology else self.name


def configs(taus: list[int], strategies: Sequence[str] = STRATEGIES) -> list[Config]:
    """The floor, then each chosen strategy's configurations (LSGD, EASGD: one per tau; D-PSGD: one per topology)."""
    plan = [Config("floor")]
    for name in STRATEGIES:
        if name not in strategies:
            continue
        if name in PER_TAU:
            plan += [Config(name, t) for t in taus]
        elif name == "dpsgd":
            plan += [Config(name, topology=t) for t in DPSGD_TOPOLOGIES]
        else:
            plan.append(Config(name))
    return plan


@dataclass(frozen=True)
class ModelSize:
    """What one replica sends: d parameters, d' = d + floating buffers, and the bytes of its integer buffers;
    ``float_sizes``: the sizes of its floating-point tensors in the strategies' layout order (parameters, then
    floating buffers), which Streaming DiLoCo's fragments are cut from."""

    params: int
    float_state: int
    int_bytes: int
    float_sizes: tuple[int, ...] = ()

    def formula_bytes_per_step(self, config: Config, world_size: int) -> float:
        """Rank 0's payload per step (see overhead.py's docstring)."""
        if config.name == "floor":
            return 0.0
        if config.name in ("dataparallel", "ddp"):
            return 4.0 * self.params
        if config.name == "signum":
            # One all-gather per bucket_cap_mb of coordinates, each a multiple of 32: the words add up to ceil(d/32).
            return 4.0 * math.ceil(self.params / 32) if world_size > 1 else 0.0
        if config.name in RING_SENDERS and config.topology != "exponential":
            return 4.0 * self.float_state * min(2, world_size - 1)  # distinct ring neighbours: 1 with P = 2
        if config.name in ("dpsgd", "adpsgd"):
            return 4.0 * self.float_state if world_size > 1 else 0.0  # one peer per step
        assert config.tau is not None
        if config.name in ("easgd", "diloco"):
            return 4.0 * self.float_state / config.tau
        if config.name == "streaming_diloco":
            settings = config.streaming
            groups = split_tensors(list(self.float_sizes), settings["fragments"])
            sizes = [sum(self.float_sizes[i] for i in group) for group in groups]
            bits, block = settings["quantize_bits"], settings["quantize_block"]
            return world_size * sum(payload_bytes(size, bits, block) for size in sizes) / config.tau
        return (4.0 * self.float_state + self.int_bytes + 4.0 * world_size) / config.tau


@dataclass
class Run:
    """One run of one configuration (rank 0's counters, the slowest rank's step time)."""

    model: str
    workers: int
    config: str
    repeat: int
    seconds_per_step: float
    bytes_per_step: float  # nan where the strategy has no meter ("ddp")
    comm_seconds_per_step: float


@dataclass
class Measured:
    """One configuration of one (model, P) group, as the tables and the plot show it."""

    median: float  # seconds per step
    best: float
    paired: list[float]  # per repeat: step time over the floor's in the same repeat
    bytes_per_step: float  # median; nan where not metered
    formula: float
    comm_ms: float


def group_results(group: list[Run], plan: dict[str, Config], size: ModelSize, world_size: int) -> dict[str, Measured]:
    floor_by_repeat = {r.repeat: r.seconds_per_step for r in group if r.config == "floor"}
    results = {}
    for label, config in plan.items():
        own = [r for r in group if r.config == label]
        times = [r.seconds_per_step for r in own]
        results[label] = Measured(
            median=statistics.median(times),
            best=min(times),
            paired=[r.seconds_per_step / floor_by_repeat[r.repeat] for r in own],
            bytes_per_step=statistics.median(r.bytes_per_step for r in own),
            formula=size.formula_bytes_per_step(config, world_size),
            comm_ms=statistics.median(r.comm_seconds_per_step for r in own) * 1e3,
        )
    return results


def table_row(label: str, m: Measured, floor: Measured) -> list[str]:
    if math.isnan(m.bytes_per_step):
        shown, match = f"{m.formula:,.0f} (formula; not metered)", "n/a"
    else:
        shown, match = f"{m.bytes_per_step:,.0f}", "yes" if _exact(m.bytes_per_step, m.formula) else "NO"
    return [
        label,
        f"{m.median * 1e3:.1f}",
        f"{m.median / floor.median:.3f}",
        f"{m.best / floor.best:.3f}",
        f"{min(m.paired):.2f}-{max(m.paired):.2f}",
        shown,
        f"{m.formula:,.0f}",
        match,
        "n/a" if label == "ddp" else f"{m.comm_ms:.2f}",
    ]


def _exact(measured: float, formula: float) -> bool:
    return abs(measured - formula) <= 1e-6 * max(1.0, formula)


def _ratio_verdict(target: Target, where: str, m: Measured, base: Measured) -> list[str]:
    """Judged on the medians; the best runs show what a quiet machine would give (load only ever slows a run)."""
    median, best = m.median / base.median, m.best / base.best
    if target.met(median):
        verdict = "met"
    elif target.met(best):
        verdict = "missed on medians (met on the best runs: noise)"
    else:
        verdict = "missed"
    return [f"{where}: {target.what}", f"{median:.3f}x ({best:.3f}x)", verdict]


def verdicts(where: str, results: dict[str, Measured]) -> list[list[str]]:
    rows = []
    if "lsgd tau=16" in results:
        rows.append(_ratio_verdict(LSGD_TARGET, where, results["lsgd tau=16"], results["floor"]))
    if "dataparallel" in results and "ddp" in results:
        rows.append(_ratio_verdict(DATAPARALLEL_TARGET, where, results["dataparallel"], results["ddp"]))
    metered = [m for m in results.values() if not math.isnan(m.bytes_per_step)]
    exact = sum(_exact(m.bytes_per_step, m.formula) for m in metered)
    rows.append(BYTES_TARGET.row(where, len(metered) - exact, f"{exact}/{len(metered)} metered configurations exact"))
    return rows


def report(folder: Path, meta: dict[str, Any]) -> str:
    """overhead.md's text (tables, targets, how it was run); writes overhead.png."""
    args = stored_args(meta)
    runs = read_rows(folder / "overhead.csv", Run)
    plan = {c.label: c for c in configs(args.taus, args.strategies)}
    sections, rows, groups = [], [], {}
    for arch in args.models:
        size = ModelSize(**meta["model_sizes"][arch])
        for world_size in args.workers:
            group = [r for r in runs if r.model == arch and r.workers == world_size]
            if not group:
                continue
            results = group_results(group, plan, size, world_size)
            groups[f"{arch}, P={world_size}"] = results
            header = ["configuration", "median ms/step", "ratio (medians)", "ratio (best runs)", "per-repeat ratios"]
            header += ["bytes/step", "formula", "match", "comm ms/step"]
            sections.append(
                f"### {arch}, P = {world_size}: {len(results['floor'].paired)} repeats (d = {size.params:,} "
                f"parameters, d' = {size.float_state:,}, {size.int_bytes} bytes of integer buffers)\n\n"
                + markdown_table(header, [table_row(label, m, results["floor"]) for label, m in results.items()])
            )
            rows += verdicts(f"{arch}, P={world_size}", results)
    plot(folder / "overhead.png", lambda axes: _draw(axes, groups), len(groups), 2, (13, 2.9 * len(groups)))
    targets = "### Targets\n\n" + verdict_table(rows, measured="measured: medians (best runs)")
    return document("Step time and bytes per step", meta, _settings(args), sections, targets)


def _settings(args: argparse.Namespace) -> str:
    optimizers = "; ".join(
        f"{name}: {', '.join(f'{k}={v}' for k, v in changes.items())} ({why})"
        for name, (changes, why) in OPTIMIZERS.items()
        if name in args.strategies
    )
    return (
        f"- settings: {args.steps} timed steps after {args.warmup} warm-up steps per run, batch {args.batch_size} per "
        f"worker, {args.image_size}x{args.image_size} synthetic images, {args.min_repeats}..{args.max_repeats} "
        f"repeats within a {args.budget:.0f} s budget, {args.threads} CPU threads shared by the P workers "
        "(max(1, threads // P) each)\n"
        "- optimizer: SGD lr 0.05, Nesterov momentum 0.9, weight decay 1e-4 (the model's default)"
        + (f"; changed where a strategy refuses it: {optimizers}" if optimizers else "")
        + f"\n- formulas (rank 0's payload per step): {FORMULAS}"
        + "".join(f"; {text}" for name, text in DILOCO_FORMULAS.items() if name in args.strategies)
        + "\n\n"
    )


COLORS = {"floor": "tab:gray", "lsgd": "tab:green", "easgd": "tab:orange", "dpsgd": "tab:blue", "d2": "tab:purple"}
COLORS |= {"adpsgd": "tab:cyan", "signum": "tab:brown"}  # DataParallel and ddp: red
COLORS |= {"diloco": "tab:olive", "streaming_diloco": "tab:pink"}


def _draw(axes: Any, groups: dict[str, dict[str, Measured]]) -> None:
    """Per (model, P): step time over the floor (bars: medians, dots: repeats), and bytes per step (log)."""
    ticks = {"rotation": 35, "ha": "right", "fontsize": 8}
    for (left, right), (title, results) in zip(axes, groups.items()):
        labels = list(results)
        colors = [COLORS.get(label.split()[0], "tab:red") for label in labels]
        floor = results["floor"].median
        xs = bars(left, labels, [([results[lab].median / floor for lab in labels], {"color": colors})], **ticks)
        for x, label in zip(xs, labels):
            left.plot([x] * len(results[label].paired), results[label].paired, "k.", markersize=3)
        left.axhline(1.0, color="black", linewidth=0.8)
        left.axhline(1.0 + TOLERANCE, color="black", linewidth=0.8, linestyle=":")
        left.set_title(f"{title}: step time / floor (bars: medians, dots: repeats)", fontsize=9)
        measured = [0.0 if math.isnan(m.bytes_per_step) else m.bytes_per_step for m in results.values()]
        bars(right, labels, [([max(m, 1.0) for m in measured], {"color": colors, "log": True})], **ticks)
        right.plot(xs, [max(m.formula, 1.0) for m in results.values()], "kx", label="formula")
        right.set_title(f"{title}: payload bytes per step and worker (log; x: formula)", fontsize=9)
