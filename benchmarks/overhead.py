"""Step time and communication of each strategy, measured side by side in one run (issue 6, item 1).

    python benchmarks/overhead.py        # CPU-sized default: CNN7 and ResNet20, P = 2 and 4, 16 configurations
                                         # (25 min on 2 cores busy with other work, load 4-5)
    python benchmarks/overhead.py --models cnn7 --workers 4 --taus 1,4,16,64 --budget 300
    python benchmarks/overhead.py --strategies lsgd,easgd,dataparallel,ddp   # issue 6's 11 only (~12-15 min)

What is measured. For each worker count P, one job of P local processes (launched like ``torchrun`` would, so
Lightning sees an external launch) trains every configuration in turn on the same process group: the *floor*
(each worker alone: LSGD with no round ever due, so no communication at all), LSGD and EASGD at each tau,
DataParallel, Lightning's own ``"ddp"``, and the strategies that communicate after every step: D-PSGD on the ring and
on the exponential (one shifting peer) topology, D² (its default lazy ring), AD-PSGD (ring) and Signum (``--strategies``
picks a subset; the floor always runs). Each run is a fresh ``Trainer.fit`` of ``--warmup + --steps`` optimizer
steps on CIFAR-shaped synthetic images (compute time does not depend on pixel values). Configurations are
interleaved and their order rotated on every repeat (after one untimed run that absorbs the process's
one-off start-up costs), so drift on a noisy, shared machine hits them all alike.

- Step time of a run: wall time from the end of step ``--warmup`` to the end of the last step, divided by
  ``--steps``, on each rank; the run's value is the slowest rank's. ``--steps`` is a multiple of every tau, so the
  timed window holds exactly ``steps / tau`` rounds.
- Repeats: as many as ``--budget`` allows (split evenly over the models and worker counts; at least
  ``--min-repeats``). Table: the median over repeats and its ratio to the floor's median (the targets are judged on
  these), the ratio of the fastest runs (what a quiet machine would show: other processes only ever slow a run
  down), and the range of the per-repeat ratios (each run over the floor of the same repeat) to show the noise.
- Bytes per step: rank 0's ``strategy.comm.bytes`` (payload handed to collectives) over the same timed window,
  divided by ``--steps``, next to the formula: DataParallel 4·d (gradients: d parameters), EASGD 4·d'/tau and LSGD
  (4·d' + 8·k + 4·P)/tau, where d' = parameters + floating-point buffers (BatchNorm statistics travel with the weights)
  and k = integer buffers (BatchNorm's int64 step counters, copied from the leader). For CNN7 (no buffers) d' = d.
  ``"ddp"`` has no meter: its payload is DataParallel's gradient all-reduce, 4·d (the formula is shown).
  The gossip strategies send their floating-point state to each peer they send to, point to point: D-PSGD's ring
  and D² 4·d' per neighbour, i.e. 8·d' (with P = 2 both ring neighbours are the same worker, which is sent to
  once: 4·d'); D-PSGD's exponential topology 4·d' (one peer); AD-PSGD 4·d' for rank 0 (an active worker sends to
  its one partner; a passive one serving several actives would send more). Signum all-gathers the packed signs of
  the d parameters: 4·ceil(d/32) bytes (about d/8).
- Optimizer: the model's SGD (lr 0.05, Nesterov momentum 0.9, weight decay 1e-4) everywhere except where a strategy
  refuses it: D² runs with momentum 0 and Signum without Nesterov (see ``OPTIMIZERS``). One SGD step costs the same
  either way up to an O(d) momentum update, far below a forward/backward pass.
- Comm ms/step: rank 0's wall time inside those collectives per step (for DataParallel, from the launch of each
  gradient bucket's all-reduce to its completion, which overlaps the backward pass).

Writes ``overhead.csv`` (one row per run), ``overhead.md`` (tables, targets, how it was run) and ``overhead.png``.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

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
from lsgd_lightning import (
    ADPSGDStrategy,
    D2Strategy,
    DataParallelStrategy,
    DPSGDStrategy,
    EASGDStrategy,
    LSGDStrategy,
    SignumStrategy,
)
from lsgd_lightning.models import ImageClassifier

NO_ROUND = 10**9  # a tau no run reaches: local SGD with the strategy's bookkeeping, no communication
TOLERANCE = 0.05  # the targets: within 5%
STRATEGIES = ("lsgd", "easgd", "dataparallel", "ddp", "dpsgd", "d2", "adpsgd", "signum")  # besides the floor
DPSGD_TOPOLOGIES = ("ring", "exponential")
FORMULAS = (
    "DataParallel and ddp 4·d; EASGD 4·d'/tau; LSGD (4·d' + integer-buffer bytes + 4·P)/tau; D-PSGD ring and D² "
    "(lazy ring) 4·d' per distinct neighbour (8·d', or 4·d' with P = 2); D-PSGD exponential and AD-PSGD 4·d' (one "
    "peer); Signum 4·ceil(d/32) (packed signs)"
)
RING_SENDERS = ("dpsgd", "d2")  # send to every ring neighbour (D² always runs on its default lazy ring)

# ImageClassifier's SGD settings where a strategy refuses the default (lr 0.05, Nesterov momentum 0.9), and why.
OPTIMIZERS: dict[str, tuple[dict[str, Any], str]] = {
    "d2": ({"momentum": 0.0, "nesterov": False}, "D² refuses momentum and Nesterov"),
    "signum": ({"nesterov": False, "lr": 1e-3}, "Signum refuses Nesterov; a sign step moves every weight by lr"),
}


@dataclass(frozen=True)
class Config:
    name: str  # floor | lsgd | easgd | dataparallel | ddp | dpsgd | d2 | adpsgd | signum
    tau: int | None = None
    topology: str | None = None  # dpsgd: ring | exponential

    def strategy(self, timeout_s: float) -> pl.strategies.Strategy:
        timeout = timedelta(seconds=timeout_s)
        if self.name == "floor":
            return LSGDStrategy(tau=NO_ROUND, final_sync=False, timeout=timeout)
        if self.name == "lsgd":
            return LSGDStrategy(tau=self.tau, final_sync=False, timeout=timeout)
        if self.name == "easgd":
            return EASGDStrategy(tau=self.tau, final_sync=False, timeout=timeout)
        if self.name == "dataparallel":
            return DataParallelStrategy(timeout=timeout)
        if self.name == "dpsgd":
            return DPSGDStrategy(topology=self.topology, final_sync=False, timeout=timeout)
        if self.name == "d2":
            return D2Strategy(final_sync=False, timeout=timeout)
        if self.name == "adpsgd":
            return ADPSGDStrategy(final_sync=False, timeout=timeout)
        if self.name == "signum":
            return SignumStrategy(final_sync=False, timeout=timeout)
        return pl.strategies.DDPStrategy(timeout=timeout)

    @property
    def optimizer(self) -> dict[str, Any]:
        """ImageClassifier keyword arguments that replace the default SGD settings for this configuration."""
        return OPTIMIZERS.get(self.name, ({}, ""))[0]

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
        if name in ("lsgd", "easgd"):
            plan += [Config(name, t) for t in taus]
        elif name == "dpsgd":
            plan += [Config(name, topology=t) for t in DPSGD_TOPOLOGIES]
        else:
            plan.append(Config(name))
    return plan


@dataclass(frozen=True)
class ModelSize:
    """What one replica sends: d parameters, d' = d + floating buffers, and the bytes of its integer buffers."""

    params: int
    float_state: int
    int_bytes: int

    @classmethod
    def of(cls, arch: str, image_size: int) -> ModelSize:
        model = ImageClassifier(arch=arch, image_size=image_size)
        buffers = list(model.buffers())
        return cls(
            params=sum(p.numel() for p in model.parameters()),
            float_state=sum(p.numel() for p in model.parameters())
            + sum(b.numel() for b in buffers if b.is_floating_point()),
            int_bytes=sum(b.numel() * b.element_size() for b in buffers if not b.is_floating_point()),
        )

    def formula_bytes_per_step(self, config: Config, world_size: int) -> float:
        """Rank 0's payload per step (see the module docstring)."""
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
        if config.name == "easgd":
            return 4.0 * self.float_state / config.tau
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


class WindowMeter(pl.Callback):
    """Wall time and the strategy's comm counters between the end of step ``warmup`` and the end of the last step."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.last = warmup, warmup + steps
        self.start: tuple[float, int, float] | None = None
        self.end: tuple[float, int, float] | None = None

    @staticmethod
    def _now(trainer: pl.Trainer) -> tuple[float, int, float]:
        comm = getattr(trainer.strategy, "comm", None)
        return time.perf_counter(), (comm.bytes if comm else 0), (comm.seconds if comm else 0.0)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            self.start = self._now(trainer)
        elif trainer.global_step == self.last:
            self.end = self._now(trainer)

    def per_step(self) -> tuple[float, float, float]:
        assert self.start is not None and self.end is not None, "the run ended before its timed window did"
        steps = self.last - self.warmup
        return tuple((b - a) / steps for a, b in zip(self.start, self.end))  # type: ignore[return-value]


def synthetic_images(n: int, image_size: int) -> TensorDataset:
    """CIFAR-shaped random images: compute time does not depend on pixel values."""
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(n, 3, image_size, image_size, generator=generator), torch.randint(0, 10, (n,), generator=generator)
    )


def measure(world_size: int, arch: str, config: Config, args: argparse.Namespace) -> tuple[float, float, float]:
    """(slowest rank's seconds/step, rank 0's bytes/step, rank 0's comm seconds/step) of one short run."""
    pl.seed_everything(0, verbose=False)
    meter = WindowMeter(args.warmup, args.steps)
    steps = args.warmup + args.steps
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=config.strategy(args.timeout),
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[meter],
    )
    model = ImageClassifier(arch=arch, image_size=args.image_size, **config.optimizer)
    data = DataLoader(synthetic_images(args.batch_size * world_size * steps, args.image_size), args.batch_size)
    trainer.fit(model, data)
    seconds, nbytes, comm_seconds = meter.per_step()
    slowest = torch.tensor([seconds])
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    metered = getattr(trainer.strategy, "comm", None) is not None
    return float(slowest), (nbytes if metered else float("nan")), comm_seconds


def worker(rank: int, world_size: int, port: int, args: argparse.Namespace, rows: Any) -> None:
    """One rank of the job: for each model, repeats of every configuration in a rotated order, within the budget.

    Repeats continue while the model's share of ``--budget`` allows another one (at least ``--min-repeats``, at most
    ``--max-repeats``); rank 0 decides and broadcasts, so every rank runs the same plan.
    """
    threads = max(1, args.threads // world_size)
    set_external_launch_env(rank, world_size, port, threads)
    torch.set_num_threads(threads)
    quiet_warnings()
    plan = configs(args.taus, args.strategies)
    share = args.budget / (len(args.models) * len(args.workers))
    for arch in args.models:
        measure(world_size, arch, plan[0], args)  # untimed: the first run in a process pays one-off start-up costs
        start, repeat, go_on = time.monotonic(), 0, True
        while go_on:
            shift = (repeat * 7) % len(plan)  # 7 is prime to the default plan's 16: every position varies
            for config in plan[shift:] + plan[:shift]:
                seconds, per_step, comm_seconds = measure(world_size, arch, config, args)
                if rank == 0:
                    rows.append(asdict(Run(arch, world_size, config.label, repeat, seconds, per_step, comm_seconds)))
                    print(
                        f"{arch} P={world_size} {config.label:<18} repeat {repeat}: {seconds * 1e3:7.1f} ms/step",
                        flush=True,
                    )
            repeat += 1
            elapsed = time.monotonic() - start
            another = repeat < args.min_repeats or (
                repeat < args.max_repeats and elapsed * (repeat + 1) / repeat < share
            )
            flag = torch.tensor([1.0 if another else 0.0])
            dist.broadcast(flag, src=0)
            go_on = bool(flag.item())


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def summarize(runs: list[Run], args: argparse.Namespace, meta: dict[str, str]) -> None:
    """Write overhead.csv (every run), overhead.md (tables, targets, how it was run) and overhead.png."""
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "overhead.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(runs[0])))
        writer.writeheader()
        writer.writerows(asdict(run) for run in runs)

    plan = {c.label: c for c in configs(args.taus, args.strategies)}
    sections, verdicts, plot = [], [], {}
    for arch in args.models:
        size = ModelSize.of(arch, args.image_size)
        for world_size in args.workers:
            group = [r for r in runs if r.model == arch and r.workers == world_size]
            if not group:
                continue
            times = {label: [r.seconds_per_step for r in group if r.config == label] for label in plan}
            median = {label: statistics.median(t) for label, t in times.items()}
            best = {label: min(t) for label, t in times.items()}
            floor_by_repeat = {r.repeat: r.seconds_per_step for r in group if r.config == "floor"}
            rows, entry = [], {}
            for label, config in plan.items():
                own = [r for r in group if r.config == label]
                paired = [r.seconds_per_step / floor_by_repeat[r.repeat] for r in own]
                measured = statistics.median(r.bytes_per_step for r in own)
                formula = size.formula_bytes_per_step(config, world_size)
                comm_ms = statistics.median(r.comm_seconds_per_step for r in own) * 1e3
                if measured != measured:
                    shown, match = f"{formula:,.0f} (formula; not metered)", "n/a"
                else:
                    shown, match = f"{measured:,.0f}", "yes" if _exact(measured, formula) else "NO"
                rows.append(
                    [
                        label,
                        f"{median[label] * 1e3:.1f}",
                        f"{median[label] / median['floor']:.3f}",
                        f"{best[label] / best['floor']:.3f}",
                        f"{min(paired):.2f}-{max(paired):.2f}",
                        shown,
                        f"{formula:,.0f}",
                        match,
                        "n/a" if label == "ddp" else f"{comm_ms:.2f}",
                    ]
                )
                entry[label] = (median[label] / median["floor"], paired, measured, formula)
            plot[f"{arch}, P={world_size}"] = entry
            header = ["configuration", "median ms/step", "ratio (medians)", "ratio (best runs)", "per-repeat ratios"]
            header += ["bytes/step", "formula", "match", "comm ms/step"]
            repeats = len(times["floor"])
            sections.append(
                f"### {arch}, P = {world_size}: {repeats} repeats (d = {size.params:,} parameters, "
                f"d' = {size.float_state:,}, {size.int_bytes} bytes of integer buffers)\n\n"
                + markdown_table(header, rows)
            )
            verdicts += _verdicts(f"{arch}, P={world_size}", median, best, entry)

    meta["load_end"] = load_average()
    optimizers = "; ".join(
        f"{name}: {', '.join(f'{k}={v}' for k, v in changes.items())} ({why})"
        for name, (changes, why) in OPTIMIZERS.items()
        if name in args.strategies
    )
    settings = (
        f"{args.steps} timed steps after {args.warmup} warm-up steps per run, batch {args.batch_size} per worker, "
        f"{args.image_size}x{args.image_size} synthetic images, {args.min_repeats}..{args.max_repeats} repeats "
        f"within a {args.budget:.0f} s budget, {args.threads} CPU threads shared by the P workers "
        "(max(1, threads // P) each)"
    )
    text = (
        "## Step time and bytes per step\n\n"
        + metadata_markdown(meta)
        + f"- settings: {settings}\n"
        + "- optimizer: SGD lr 0.05, Nesterov momentum 0.9, weight decay 1e-4 (the model's default)"
        + (f"; changed where a strategy refuses it: {optimizers}" if optimizers else "")
        + "\n"
        + f"- formulas (rank 0's payload per step): {FORMULAS}\n\n"
        + "\n".join(sections)
        + "\n### Targets\n\n"
        + markdown_table(["target", "measured: medians (best runs)", "verdict"], verdicts)
    )
    (out / "overhead.md").write_text(text)
    print(text)
    _plot(plot, out / "overhead.png")


def _exact(measured: float, formula: float) -> bool:
    return abs(measured - formula) <= 1e-6 * max(1.0, formula)


def _ratio_verdict(what: str, median: float, best: float) -> list[str]:
    """Judged on the medians (the issue's method); the best runs show what a quiet machine would give."""
    if median <= 1 + TOLERANCE:
        verdict = "met"
    elif best <= 1 + TOLERANCE:
        verdict = "missed on medians (met on the best runs: noise)"
    else:
        verdict = "missed"
    return [what, f"{median:.3f}x ({best:.3f}x)", verdict]


def _verdicts(where: str, median: dict[str, float], best: dict[str, float], entry: dict[str, tuple]) -> list[list[str]]:
    verdicts = []
    if "lsgd tau=16" in median:
        verdicts.append(
            _ratio_verdict(
                f"{where}: LSGD tau=16 within 5% of the floor",
                median["lsgd tau=16"] / median["floor"],
                best["lsgd tau=16"] / best["floor"],
            )
        )
    if "dataparallel" in median and "ddp" in median:
        verdicts.append(
            _ratio_verdict(
                f"{where}: DataParallel within 5% of ddp",
                median["dataparallel"] / median["ddp"],
                best["dataparallel"] / best["ddp"],
            )
        )
    metered = [(m, f) for _, _, m, f in entry.values() if m == m]
    exact = sum(_exact(m, f) for m, f in metered)
    verdicts.append(
        [
            f"{where}: bytes/step match the formulas",
            f"{exact}/{len(metered)} metered configurations exact",
            "met" if exact == len(metered) else "missed",
        ]
    )
    return verdicts


COLORS = {"floor": "tab:gray", "lsgd": "tab:green", "easgd": "tab:orange", "dpsgd": "tab:blue", "d2": "tab:purple"}
COLORS |= {"adpsgd": "tab:cyan", "signum": "tab:brown"}  # DataParallel and ddp: red


def _plot(plot: dict[str, dict[str, tuple]], path: Path) -> None:
    plt = pyplot()
    if plt is None or not plot:
        return
    fig, axes = plt.subplots(len(plot), 2, figsize=(13, 2.9 * len(plot)), squeeze=False)
    for (left, right), (title, entry) in zip(axes, plot.items()):
        labels = list(entry)
        xs = range(len(labels))
        colors = [COLORS.get(lab.split()[0], "tab:red") for lab in labels]
        left.bar(xs, [entry[lab][0] for lab in labels], color=colors)
        for x, lab in zip(xs, labels):
            left.plot([x] * len(entry[lab][1]), entry[lab][1], "k.", markersize=3)
        left.axhline(1.0, color="black", linewidth=0.8)
        left.axhline(1.0 + TOLERANCE, color="black", linewidth=0.8, linestyle=":")
        left.set_title(f"{title}: step time / floor (bars: medians, dots: repeats)", fontsize=9)
        left.set_xticks(list(xs), labels, rotation=35, ha="right", fontsize=8)
        measured = [entry[lab][2] if entry[lab][2] == entry[lab][2] else 0.0 for lab in labels]
        right.bar(xs, [max(m, 1.0) for m in measured], color=colors, log=True)
        right.plot(list(xs), [max(entry[lab][3], 1.0) for lab in labels], "kx", label="formula")
        right.set_title(f"{title}: payload bytes per step and worker (log; x: formula)", fontsize=9)
        right.set_xticks(list(xs), labels, rotation=35, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="cnn7,resnet20", type=str_list, help="cnn7, resnet20, vgg16, resnet50")
    parser.add_argument("--workers", default="2,4", type=int_list, help="worker counts P (one job each)")
    parser.add_argument("--taus", default="1,4,16,64", type=int_list)
    parser.add_argument(
        "--strategies",
        default=",".join(STRATEGIES),
        type=str_list,
        help=f"besides the floor: {', '.join(STRATEGIES)} (dpsgd runs both of {', '.join(DPSGD_TOPOLOGIES)})",
    )
    parser.add_argument("--steps", type=int, default=64, help="timed steps per run; a multiple of every tau")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds of measuring, split over models x P")
    parser.add_argument("--min-repeats", type=int, default=3)
    parser.add_argument("--max-repeats", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16, help="per worker")
    parser.add_argument("--image-size", type=int, default=28, help="the LSGD paper's 28x28 CIFAR crops")
    parser.add_argument("--threads", type=int, default=cpu_count(), help="CPU threads shared by the workers")
    parser.add_argument("--timeout", type=float, default=120.0, help="collective timeout (s)")
    parser.add_argument("--deadline", type=float, default=3600.0, help="give up on a job after this many seconds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "overhead")
    args = parser.parse_args(argv)
    bad = [tau for tau in args.taus if tau < 1 or args.steps % tau]
    if bad or args.steps < 1 or args.warmup < 1 or not 1 <= args.min_repeats <= args.max_repeats:
        parser.error(f"--steps ({args.steps}) must be a multiple of every tau (not of {bad}); 1 <= min <= max repeats")
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown:
        parser.error(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    if "adpsgd" in args.strategies and any(p % 2 for p in args.workers):
        parser.error("adpsgd runs on a ring, which needs an even number of workers: drop it or the odd P")

    meta = run_metadata([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    start = time.perf_counter()
    runs: list[Run] = []
    for world_size in args.workers:
        with mp.Manager() as manager:
            shared = manager.list()
            run_local_job(worker, world_size, (world_size, free_port(), args, shared), args.deadline)
            runs.extend(Run(**row) for row in shared)
    meta["wall_time"] = f"{time.perf_counter() - start:.0f} s"
    summarize(runs, args, meta)


if __name__ == "__main__":
    main()
