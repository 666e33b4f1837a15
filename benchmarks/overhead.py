"""Step time and communication of each strategy, measured side by side in one run.

    python benchmarks/overhead.py        # CPU-sized default: CNN7 and ResNet20, P = 2 and 4, 16 configurations
                                         # (25 min on 2 cores busy with other work, load 4-5)
    python benchmarks/overhead.py --models cnn7 --workers 4 --taus 1,4,16,64 --budget 300
    python benchmarks/overhead.py --strategies lsgd,easgd,dataparallel,ddp   # 11 configurations (~12-15 min)

What is measured. For each worker count P, one job of P local processes (launched like ``torchrun`` would, so
Lightning sees an external launch) trains every configuration in turn on the same process group: the *floor*
(each worker alone: LSGD with no round ever due, so no communication at all), LSGD, EASGD, DiLoCo and Streaming
DiLoCo (4 fragments, capped at tau; outer step 1 step after its all-gather, 0 at tau = 1; int8 codes) at each tau,
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
  the d parameters: 4·ceil(d/32) bytes (about d/8). DiLoCo all-reduces its pseudo-gradients: 4·d'/tau. Streaming
  DiLoCo all-gathers each fragment's int8 codes and float32 scales (one per 64 values) once per tau:
  P·Σ_f (d_f + 4·ceil(d_f/64))/tau, the fragments cut from the model's tensors as the strategy cuts them.
- Optimizer: the model's SGD (lr 0.05, Nesterov momentum 0.9, weight decay 1e-4) everywhere except where a strategy
  refuses it: D² runs with momentum 0 and Signum without Nesterov (see ``OPTIMIZERS``). One SGD step costs the same
  either way up to an O(d) momentum update, far below a forward/backward pass.
- Comm ms/step: rank 0's wall time inside those collectives per step (for DataParallel, from the launch of each
  gradient bucket's all-reduce to its completion, which overlaps the backward pass).

Writes ``overhead.csv`` (one row per run) and ``meta.json`` (how it was run), then from those two files
``overhead.md`` (tables, targets) and ``overhead.png``; ``python benchmarks/report.py DIR`` rewrites the last two.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

import driver
import lsgd_lightning as lsgd
from lsgd_lightning.models import ImageClassifier
from overhead_report import DPSGD_TOPOLOGIES, STRATEGIES, Config, ModelSize, Run, configs, report

NO_ROUND = 10**9  # a tau no run reaches: local SGD with the strategy's bookkeeping, no communication
STRATEGY_CLASSES = {
    "floor": lsgd.LSGDStrategy,
    "lsgd": lsgd.LSGDStrategy,
    "easgd": lsgd.EASGDStrategy,
    "dpsgd": lsgd.DPSGDStrategy,
    "d2": lsgd.D2Strategy,
    "adpsgd": lsgd.ADPSGDStrategy,
    "signum": lsgd.SignumStrategy,
    "diloco": lsgd.DiLoCoStrategy,
    "streaming_diloco": lsgd.StreamingDiLoCoStrategy,
}


def make_strategy(config: Config, timeout_s: float) -> pl.strategies.Strategy:
    timeout = timedelta(seconds=timeout_s)
    if config.name == "dataparallel":  # no final sync to switch off: every replica is the same model
        return lsgd.DataParallelStrategy(timeout=timeout)
    if config.name == "ddp":
        return pl.strategies.DDPStrategy(timeout=timeout)
    options = {"floor": {"tau": NO_ROUND}, "lsgd": {"tau": config.tau}, "easgd": {"tau": config.tau}}
    options["dpsgd"] = {"topology": config.topology}
    if config.name == "diloco":
        options["diloco"] = {"tau": config.tau}
    if config.name == "streaming_diloco":
        options["streaming_diloco"] = {"tau": config.tau, **config.streaming}
    return STRATEGY_CLASSES[config.name](final_sync=False, timeout=timeout, **options.get(config.name, {}))


def model_size(arch: str, image_size: int) -> ModelSize:
    model = ImageClassifier(arch=arch, image_size=image_size)
    params = sum(p.numel() for p in model.parameters())
    buffers = list(model.buffers())
    floating = [p.numel() for p in model.parameters()] + [b.numel() for b in buffers if b.is_floating_point()]
    return ModelSize(
        params=params,
        float_state=params + sum(b.numel() for b in buffers if b.is_floating_point()),
        int_bytes=sum(b.numel() * b.element_size() for b in buffers if not b.is_floating_point()),
        float_sizes=tuple(floating),
    )


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


def timed_run(world_size: int, arch: str, config: Config, args: argparse.Namespace) -> tuple[float, float, float]:
    """(slowest rank's seconds/step, rank 0's bytes/step, rank 0's comm seconds/step) of one short run."""
    pl.seed_everything(0, verbose=False)
    meter = WindowMeter(args.warmup, args.steps)
    steps = args.warmup + args.steps
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=make_strategy(config, args.timeout),
        max_steps=steps,
        **driver.QUIET_TRAINER,
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


def worker(rank: int, world_size: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One rank of the job: for each model, repeats of every configuration in a rotated order, within the budget.

    Repeats continue while the model's share of ``--budget`` allows another one (at least ``--min-repeats``, at most
    ``--max-repeats``); rank 0 decides and broadcasts, so every rank runs the same plan. Rank 0 returns the runs.
    """
    driver.quiet_warnings()
    plan = configs(args.taus, args.strategies)
    share = args.budget / (len(args.models) * len(args.workers))
    rows = []
    for arch in args.models:
        timed_run(world_size, arch, plan[0], args)  # untimed: the first run in a process pays one-off start-up costs
        start, repeat, go_on = time.monotonic(), 0, True
        while go_on:
            shift = (repeat * 7) % len(plan)  # 7 is prime to the default plan's 16: every position varies
            for config in plan[shift:] + plan[:shift]:
                seconds, per_step, comm_seconds = timed_run(world_size, arch, config, args)
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
    return rows


def measure(args: argparse.Namespace, meta: dict[str, Any]) -> None:
    """One job per worker count; writes overhead.csv; the model sizes go to meta.json (the formulas need them)."""
    meta["model_sizes"] = {arch: asdict(model_size(arch, args.image_size)) for arch in args.models}
    driver.write_rows(args.out / "overhead.csv", Run, [Run(**row) for row in driver.run_jobs(worker, args)])


def main(argv: list[str] | None = None) -> None:
    parser = driver.parser_for(__doc__)
    parser.add_argument(
        "--models", default="cnn7,resnet20", type=driver.str_list, help="cnn7, resnet20, vgg16, resnet50"
    )
    parser.add_argument("--workers", default="2,4", type=driver.int_list, help="worker counts P (one job each)")
    parser.add_argument("--taus", default="1,4,16,64", type=driver.int_list)
    parser.add_argument(
        "--strategies",
        default=",".join(STRATEGIES),
        type=driver.str_list,
        help=f"besides the floor: {', '.join(STRATEGIES)} (dpsgd runs both of {', '.join(DPSGD_TOPOLOGIES)})",
    )
    parser.add_argument("--steps", type=int, default=64, help="timed steps per run; a multiple of every tau")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds of measuring, split over models x P")
    parser.add_argument("--min-repeats", type=int, default=3)
    parser.add_argument("--max-repeats", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16, help="per worker")
    parser.add_argument("--image-size", type=int, default=28, help="the LSGD paper's 28x28 CIFAR crops")
    driver.add_job_arguments(parser, timeout=120.0, deadline=3600.0, out="overhead")
    args = parser.parse_args(argv)
    bad = [tau for tau in args.taus if tau < 1 or args.steps % tau]
    if bad or args.steps < 1 or args.warmup < 1 or not 1 <= args.min_repeats <= args.max_repeats:
        parser.error(f"--steps ({args.steps}) must be a multiple of every tau (not of {bad}); 1 <= min <= max repeats")
    driver.check_known(parser, args.strategies, STRATEGIES, "strategies")
    if "adpsgd" in args.strategies and any(p % 2 for p in args.workers):
        parser.error("adpsgd runs on a ring, which needs an even number of workers: drop it or the odd P")
    driver.run("overhead", args, argv, measure, report)


if __name__ == "__main__":
    main()
