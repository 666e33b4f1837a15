"""Step time and communication of each strategy, measured side by side in one run.

    python benchmarks/overhead.py                                   # CPU-sized default (a few minutes on 2 cores)
    python benchmarks/overhead.py --models cnn7,resnet20 --workers 2,4 --taus 1,4,16,64 --repeats 5

For each worker count P, one job of P local processes (launched like ``torchrun`` would: Lightning sees an external
launch) runs every configuration in turn on the same process group: the floor (each worker alone: LSGD with no
round ever due), LSGD and EASGD at each tau, DataParallel, and Lightning's own ``"ddp"``. Configurations are
interleaved and their order rotated on every repeat, so drift on a noisy machine hits them all alike. A run's step
time is the slowest rank's mean over the steps after ``--warmup``; the table reports the median over repeats and
its ratio to the floor's median. Bytes per step come from the strategies' ``comm/bytes`` meters (``ddp`` has
none: its payload is the same gradient all-reduce as DataParallel's, 4·d).

Writes ``overhead.csv``, ``overhead.md`` and ``overhead.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import statistics
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

from lsgd_lightning import DataParallelStrategy, EASGDStrategy, LSGDStrategy
from lsgd_lightning.models import ImageClassifier

NO_ROUND = 10**9  # a tau no run reaches: local SGD with the strategy's bookkeeping, no communication


@dataclass(frozen=True)
class Config:
    name: str
    tau: int | None = None

    def strategy(self) -> pl.strategies.Strategy:
        timeout = timedelta(seconds=120)
        if self.name == "floor":
            return LSGDStrategy(tau=NO_ROUND, final_sync=False, timeout=timeout)
        if self.name == "lsgd":
            return LSGDStrategy(tau=self.tau, final_sync=False, timeout=timeout)
        if self.name == "easgd":
            return EASGDStrategy(tau=self.tau, final_sync=False, timeout=timeout)
        if self.name == "dataparallel":
            return DataParallelStrategy(timeout=timeout)
        return pl.strategies.DDPStrategy(timeout=timeout)

    @property
    def label(self) -> str:
        return f"{self.name} tau={self.tau}" if self.tau else self.name


def configs(taus: list[int]) -> list[Config]:
    return (
        [Config("floor")]
        + [Config("lsgd", t) for t in taus]
        + [Config("easgd", t) for t in taus]
        + [Config("dataparallel"), Config("ddp")]
    )


class StepTimer(pl.Callback):
    """Mean wall time per training step after the first ``warmup`` steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: float | None = None
        self.timed_steps = 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        elif trainer.global_step > self.warmup:
            self.timed_steps += 1

    def mean(self) -> float:
        assert self.start is not None and self.timed_steps > 0
        return (time.perf_counter() - self.start) / self.timed_steps


def synthetic_images(n: int, image_size: int) -> TensorDataset:
    """CIFAR-shaped random images: compute time does not depend on pixel values."""
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(n, 3, image_size, image_size, generator=generator), torch.randint(0, 10, (n,), generator=generator)
    )


def measure(rank: int, world_size: int, arch: str, config: Config, args: argparse.Namespace) -> tuple[float, float]:
    """(slowest rank's mean step time, bytes per step) of one short training run."""
    pl.seed_everything(0, verbose=False)
    timer = StepTimer(args.warmup)
    steps = args.warmup + args.steps
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=config.strategy(),
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    model = ImageClassifier(arch=arch, image_size=args.image_size)
    data = DataLoader(synthetic_images(args.batch_size * world_size * steps, args.image_size), args.batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data)
    step_time = torch.tensor([timer.mean()])
    dist.all_reduce(step_time, op=dist.ReduceOp.MAX)
    comm = getattr(trainer.strategy, "comm", None)
    return float(step_time), (comm.bytes / steps if comm is not None else float("nan"))


def worker(rank: int, world_size: int, port: int, args: argparse.Namespace, rows: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0", OMP_NUM_THREADS="1"
    )
    torch.set_num_threads(max(1, args.threads // world_size))
    plan = configs(args.taus)
    for arch in args.models:
        for repeat in range(args.repeats):
            shift = repeat % len(plan)
            for config in plan[shift:] + plan[:shift]:  # rotated order: no configuration always runs first
                seconds, per_step = measure(rank, world_size, arch, config, args)
                if rank == 0:
                    rows.append((arch, world_size, config.label, repeat, seconds, per_step))
                    print(f"{arch} P={world_size} {config.label:<18} repeat {repeat}: {seconds * 1e3:7.1f} ms/step")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def summarize(rows: list[tuple], out: Path, args: argparse.Namespace) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "overhead.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "workers", "config", "repeat", "seconds_per_step", "bytes_per_step"])
        writer.writerows(rows)
    table = [
        "| model | P | configuration | median ms/step | ratio to floor | bytes/step |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    plot: dict[str, dict[str, float]] = {}
    for arch in args.models:
        for world_size in args.workers:
            group = [r for r in rows if r[0] == arch and r[1] == world_size]
            labels = list(dict.fromkeys(r[2] for r in group))
            medians = {lab: statistics.median(r[4] for r in group if r[2] == lab) for lab in labels}
            floor = medians["floor"]
            for label in labels:
                per_step = statistics.median(r[5] for r in group if r[2] == label)
                shown = "n/a (not metered)" if per_step != per_step else f"{per_step:,.0f}"
                ratio = medians[label] / floor
                table.append(
                    f"| {arch} | {world_size} | {label} | {medians[label] * 1e3:.1f} | {ratio:.3f} | {shown} |"
                )
                plot.setdefault(f"{arch} P={world_size}", {})[label] = ratio
    (out / "overhead.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'lsgd-lightning[app]').")
        return
    fig, axes = plt.subplots(len(plot), 1, figsize=(9, 2.8 * len(plot)), squeeze=False)
    for axis, (title, ratios) in zip(axes[:, 0], plot.items()):
        axis.bar(list(ratios), list(ratios.values()), color="tab:blue")
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_title(title)
        axis.set_ylabel("step time / floor")
        axis.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(out / "overhead.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="cnn7", type=lambda s: s.split(","))
    parser.add_argument("--workers", default="2", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--taus", default="1,4,16,64", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--steps", type=int, default=64, help="timed steps per run (after --warmup)")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU threads in all")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "overhead")
    args = parser.parse_args()

    rows: list[tuple] = []
    for world_size in args.workers:
        with mp.Manager() as manager:
            shared = manager.list()
            mp.start_processes(worker, (world_size, free_port(), args, shared), nprocs=world_size, start_method="spawn")
            rows.extend(shared)
    summarize(rows, args.out, args)


if __name__ == "__main__":
    main()
