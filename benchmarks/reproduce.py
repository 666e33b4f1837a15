"""The paper's comparison: test error against wall-clock time and steps, and who leads.

    # CPU-sized preset (about 10 minutes on 2 cores): CNN7 on a CIFAR-10 subset (1,000 train / 200 test images per
    # class), 4 workers for LSGD, EASGD and DataParallel, plus one worker alone (plain SGD), 100 s of training each
    mkdir -p .data && tar xzf /path/to/cifar10-jpeg.tar.gz -C .data       # train/<class>/*.jpg, test/<class>/*.jpg
    python benchmarks/reproduce.py --data-root .data
    # plus the decentralized and 1-bit strategies (D-PSGD, D², AD-PSGD, Signum): about 20 minutes
    python benchmarks/reproduce.py --data-root .data --strategies all

    # full-size presets (GPU; one worker process per GPU): the whole of CIFAR-10, the presets' epochs and LR drops
    python benchmarks/reproduce.py --preset cifar10_resnet20 --data-root /data/cifar10-jpeg --workers 4,16

Every run composes the ``lsgd-train`` app's own configuration (``experiment=<preset>`` plus the overrides listed
per preset below and ``data=imagefolder``, since the JPEG folders are what this machine has) and builds the
datamodule, model and strategy with the app's builders, so the numbers belong to the presets users run. Each run is a
multi-process job of its own (processes launched like ``torchrun``), one after another:

- every ``--val-every`` optimizer steps (full-size presets: every epoch) the strategy's evaluation model is evaluated
  on the test split (LSGD: the workers' average with BatchNorm statistics re-estimated on 20 training batches per
  worker, what every LSGD figure of the paper reports, ``lsgd:strategy.eval_on=leader`` for the leader; EASGD: the
  centre variable; DataParallel and SGD: the model; D-PSGD, D² and AD-PSGD: the workers' average; Signum: the common
  parameters with the workers' averaged buffers), and rank 0 records (training time, step, test error). Training
  time is wall time since ``fit`` started minus the time spent evaluating; steps are optimizer steps per worker;
- at every LSGD round rank 0 records the elected leader (``strategy.round_metrics["lsgd/leader"]``, the value LSGD
  logs as ``lsgd/leader``);
- a run stops at the first evaluation after ``--budget`` seconds of training time (all ranks decide together), or at
  the preset's last epoch;
- payload bytes per step: rank 0's ``strategy.comm.bytes`` during training, without the evaluation swaps and the
  final sync, divided by the steps.

Strategies: ``lsgd``, ``easgd``, ``dataparallel`` and ``sgd`` by default; ``dpsgd``, ``d2``, ``adpsgd`` and ``signum``
on request (``--strategies``, ``all`` for every one), with their app configs (D-PSGD: ring; D²: lazy ring; AD-PSGD:
ring). The changes in ``STRATEGY_OVERRIDES`` come before the user's overrides, which win: LSGD evaluates the
workers' average (see above); a strategy that refuses the presets' Nesterov SGD gets another optimizer (D²: momentum
0; Signum: no Nesterov and lr 1e-3). An override prefixed with a strategy's name and a colon applies to that
strategy's runs only, e.g. ``lsgd:strategy.tau=4`` (the other strategies' configs have no ``tau``).

Writes to ``--out``: ``reproduce_curves.csv`` (every evaluation), ``reproduce_runs.csv`` (steps and payload of each
run), ``reproduce_leaders.csv`` (the leader at each LSGD round) and ``meta.json`` (how it was run), then from those
files ``reproduce.md`` (final error table, time and steps to ``--target-error``, leader counts), ``reproduce_error.png``
(error vs time and vs steps) and ``reproduce_leader.png`` (the leader at each round and how often each worker led);
``python benchmarks/report.py DIR`` rewrites the last three.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

import driver
from lsgd_lightning.local_job import run_local_job
from reproduce_report import CURVES, LEADERS, RUNS, STRATEGY_OVERRIDES, Leader, Point, RunRecord, report, run_label

DEFAULT_STRATEGIES = ("lsgd", "easgd", "dataparallel", "sgd")  # sgd: one worker alone, the paper's SGD baseline
# Communicate after every step: not in the default list, which keeps the CPU preset at about 10 minutes.
OPTIONAL_STRATEGIES = ("dpsgd", "d2", "adpsgd", "signum")
STRATEGIES = DEFAULT_STRATEGIES + OPTIONAL_STRATEGIES


@dataclass(frozen=True)
class Preset:
    """An ``experiment=`` preset of the app plus what this benchmark changes for its size."""

    experiment: str
    overrides: tuple[str, ...] = ()
    workers: tuple[int, ...] = (4,)
    train_per_class: int | None = None  # a subset of the training images (symlinks), or all of them
    test_per_class: int | None = None
    budget_s: float | None = None  # training-time budget per run (evaluation excluded)
    val_every: int | None = None  # optimizer steps between evaluations; None: every epoch
    target_error: float = 0.1
    accelerator: str = "gpu"
    # All workers of a run on one device: each process is a "node" of one device (Trainer(devices=1,
    # num_nodes=P), NODE_RANK = its rank), over gloo (NCCL refuses two ranks on one GPU; gloo moves CUDA tensors
    # through the host for all-reduce, all-gather and broadcast, the collectives LSGD, EASGD and DataParallel use).
    share_device: bool = False


PRESETS = {
    # The CNN7 preset (batch 128 per worker, lr 0.05, Nesterov) on a subset, no LR drops, 100 s of training per run.
    "cpu": Preset(
        "cifar10_cnn7",
        ("optim.milestones=[]", "trainer.max_epochs=1000"),
        workers=(4,),
        train_per_class=1000,
        test_per_class=200,
        budget_s=100.0,
        val_every=10,
        target_error=0.55,
        accelerator="cpu",
    ),
    "cifar10_cnn7": Preset("cifar10_cnn7", workers=(4, 16), target_error=0.20),
    "cifar10_resnet20": Preset("cifar10_resnet20", workers=(4, 16), target_error=0.10),
    "cifar10_vgg16": Preset("cifar10_vgg16", workers=(4, 16), target_error=0.10),
    # The ResNet20 comparison on one GPU shared by 4 workers, its schedule shortened to SHORT_EPOCHS with the LR
    # drops at the same fractions as the preset's 82 and 123 of 164 epochs (benchmarks/resnet20_gpu.py).
    "resnet20_1gpu": Preset(
        "cifar10_resnet20",
        ("trainer.max_epochs=20", "optim.milestones=[10,15]"),
        workers=(4,),
        target_error=0.15,
        share_device=True,
    ),
}


@dataclass
class RunSpec:
    """One training run: a strategy with a number of workers."""

    strategy: str
    workers: int
    overrides: list[str]
    val_every: int | None
    budget_s: float | None
    max_steps: int
    accelerator: str
    timeout_s: float = 300.0
    share_device: bool = False


@dataclass
class RunResult:
    """What rank 0 recorded during one run."""

    strategy: str
    workers: int
    points: list[dict[str, float]] = field(default_factory=list)  # train_s, wall_s, step, epoch, error
    leaders: list[tuple[int, int]] = field(default_factory=list)  # (step, leader rank) per LSGD round
    steps: int = 0
    comm_bytes: float = 0.0  # training traffic of rank 0 (evaluation swaps and the final sync left out)
    comm_rounds: float = 0.0


def run_overrides(preset: Preset, strategy: str, workers: int, args: argparse.Namespace, root: Path) -> list[str]:
    overrides = [f"experiment={preset.experiment}", *preset.overrides, "data=imagefolder", f"data.root={root}"]
    overrides += [*driver.CIFAR_NORMALIZATION, f"workers={workers}", "logger=none", "trainer.default_root_dir=."]
    overrides += [f"trainer.accelerator={preset.accelerator}", f"seed={args.seed}"]
    if strategy != "sgd":
        overrides += [f"strategy={strategy}", f"strategy.timeout_s={args.timeout:g}"]
        overrides += ["+strategy.process_group_backend=gloo"] if preset.share_device else []
    if args.cache_dir:
        overrides.append(f"data.cache_dir={args.cache_dir}")
    overrides += STRATEGY_OVERRIDES.get(strategy, ((), ""))[0]
    for item in args.override:
        scope, colon, scoped = item.partition(":")
        if not (colon and scope in STRATEGIES):
            overrides.append(item)
        elif scope == strategy:
            overrides.append(scoped)
    return overrides


class Recorder(pl.Callback):
    """Rank 0 records the test error at every evaluation and the leader at every LSGD round; enforces the budget."""

    def __init__(self, budget_s: float | None) -> None:
        self.budget_s = budget_s
        self.points: list[dict[str, float]] = []
        self.leaders: list[tuple[int, int]] = []
        self.evaluating = 0.0
        self.train_bytes = 0
        self.eval_bytes = 0  # payload of the evaluation swaps (LSGD/EASGD), left out of the training traffic
        self.rounds_seen = 0

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        strategy = trainer.strategy
        comm = getattr(strategy, "comm", None)
        if comm is not None and comm.rounds > self.rounds_seen:
            self.rounds_seen = comm.rounds
            leader = getattr(strategy, "round_metrics", {}).get("lsgd/leader")
            if leader is not None:
                self.leaders.append((trainer.global_step, int(leader)))

    @staticmethod
    def _comm_bytes(trainer: pl.Trainer) -> int:
        comm = getattr(trainer.strategy, "comm", None)
        return comm.bytes if comm is not None else 0

    def on_validation_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        # Callbacks run before the strategy's hook: the swap-in of the leader/centre comes after this snapshot.
        self.eval_start = time.perf_counter()
        self.eval_start_bytes = self._comm_bytes(trainer)

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        now = time.perf_counter()
        self.eval_bytes += self._comm_bytes(trainer) - self.eval_start_bytes
        acc = trainer.callback_metrics.get("val/acc")
        self.points.append(
            {
                "train_s": self.eval_start - self.start - self.evaluating,
                "wall_s": now - self.start,
                "step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "error": float("nan") if acc is None else 1.0 - float(acc),
            }
        )
        self.evaluating += now - self.eval_start
        if self.budget_s is not None:  # training time, so that frequent evaluations do not shorten a run's training
            over = self.points[-1]["train_s"] >= self.budget_s
            trainer.should_stop = trainer.strategy.reduce_boolean_decision(over, all=False)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        # Callbacks run before the strategy's on_train_end: the final sync's broadcast is not training traffic.
        self.train_bytes = self._comm_bytes(trainer) - self.eval_bytes


def run_worker(rank: int, world_size: int, spec: RunSpec) -> dict[str, Any] | None:
    """One rank of a run: build everything from the app's configuration and train; rank 0 returns the record."""
    from lsgd_lightning.train import build_datamodule, build_model, build_strategy

    driver.quiet_warnings()
    cfg = driver.compose(spec.overrides)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    model = build_model(cfg, datamodule)
    recorder = Recorder(spec.budget_s)
    devices, nodes = spec.workers, 1
    if spec.share_device:  # one device per "node", all of them the same device (see Preset.share_device)
        os.environ.update(NODE_RANK=str(rank), LOCAL_RANK="0")
        devices, nodes = 1, spec.workers
    trainer = pl.Trainer(
        accelerator=spec.accelerator,
        devices=devices,
        num_nodes=nodes,
        strategy=build_strategy(cfg) if spec.strategy != "sgd" else "auto",
        max_epochs=cfg.trainer.max_epochs,
        max_steps=spec.max_steps,
        val_check_interval=spec.val_every or 1.0,
        check_val_every_n_epoch=None if spec.val_every else 1,
        num_sanity_val_steps=0,
        precision=cfg.trainer.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    trainer.fit(model, datamodule=datamodule)
    if not trainer.is_global_zero:
        return None
    comm = getattr(trainer.strategy, "comm", None)
    result = RunResult(spec.strategy, spec.workers, recorder.points, recorder.leaders, trainer.global_step)
    result.comm_bytes, result.comm_rounds = float(recorder.train_bytes), float(comm.rounds) if comm else 0.0
    return asdict(result)


def make_subset(root: Path, dest: Path, train_per_class: int | None, test_per_class: int | None) -> Path:
    """``dest`` with symlinks to the first N images (sorted names) of each class of ``root``'s train and test splits."""
    if train_per_class is None and test_per_class is None:
        return root
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        source = root / split
        if not source.is_dir():
            sys.exit(
                f"reproduce: {source} does not exist. Extract the CIFAR-10 JPEG folders first, e.g. "
                "`mkdir -p .data && tar xzf cifar10-jpeg.tar.gz -C .data`, and pass --data-root .data"
            )
        for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
            files = sorted(p for p in class_dir.iterdir() if p.is_file())
            target = dest / split / class_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for path in files if count is None else files[:count]:
                link = target / path.name
                if not link.exists():
                    link.symlink_to(path.resolve())
    return dest


def write_results(results: list[RunResult], out: Path) -> None:
    """The three CSV files the report is written from."""
    points = [
        Point(r.strategy, r.workers, p["train_s"], p["wall_s"], int(p["step"]), int(p["epoch"]), p["error"])
        for r in results
        for p in r.points
    ]
    driver.write_rows(out / CURVES, Point, points)
    runs = [RunRecord(r.strategy, r.workers, r.steps, r.comm_bytes, r.comm_rounds) for r in results]
    driver.write_rows(out / RUNS, RunRecord, runs)
    leaders = [Leader(r.strategy, r.workers, step, leader) for r in results for step, leader in r.leaders]
    driver.write_rows(out / LEADERS, Leader, leaders)


def resolve_preset(args: argparse.Namespace) -> Preset:
    """The preset with the command line's changes."""
    base = PRESETS[args.preset]
    return Preset(
        base.experiment,
        base.overrides,
        tuple(args.workers or base.workers),
        args.train_per_class or base.train_per_class,
        args.test_per_class or base.test_per_class,
        args.budget if args.budget is not None else base.budget_s,
        args.val_every or base.val_every,
        args.target_error if args.target_error is not None else base.target_error,
        args.accelerator or base.accelerator,
        base.share_device,
    )


def train(strategy: str, workers: int, preset: Preset, args: argparse.Namespace, root: Path) -> RunResult:
    """One run: a local job of ``workers`` processes, one thread each (a share of the cores on CPU)."""
    spec = RunSpec(
        strategy=strategy,
        workers=workers,
        overrides=run_overrides(preset, strategy, workers, args, root),
        val_every=preset.val_every,
        budget_s=preset.budget_s,
        max_steps=args.max_steps,
        accelerator=preset.accelerator,
        timeout_s=args.timeout,
        share_device=preset.share_device,
    )
    threads = max(1, driver.cpu_count() // workers) if preset.accelerator == "cpu" else 1
    deadline = args.deadline or (3 * preset.budget_s + 300 if preset.budget_s else 7 * 24 * 3600)
    start = time.perf_counter()
    result = RunResult(**run_local_job(run_worker, workers, (spec,), deadline_s=deadline, threads=threads)[0])
    final = f"{result.points[-1]['error'] * 100:.1f}%" if result.points else "n/a"
    label, seconds = run_label(result.strategy, result.workers), time.perf_counter() - start
    print(f"reproduce: {label}: {result.steps} steps, final test error {final} ({seconds:.0f} s)", flush=True)
    return result


def measure(args: argparse.Namespace, meta: dict[str, Any]) -> None:
    """Every run in turn; writes the three CSV files; the preset and the data go to meta.json."""
    preset = resolve_preset(args)
    subset = args.work_dir / f"cifar10-subset-{preset.train_per_class}-{preset.test_per_class}"
    root = make_subset(args.data_root.resolve(), subset, preset.train_per_class, preset.test_per_class)
    meta["preset_name"], meta["preset"] = args.preset, asdict(preset)
    meta["strategy_overrides"] = {name: list(changes) for name, (changes, _) in STRATEGY_OVERRIDES.items()}
    meta["data"] = (
        f"{preset.train_per_class or 'all'} train / {preset.test_per_class or 'all'} test images per class "
        f"of `{args.data_root}`"
    )
    # Decode (and cache) the images once, here, before any worker starts.
    from lsgd_lightning.train import build_datamodule

    build_datamodule(driver.compose(run_overrides(preset, "sgd", 1, args, root))).prepare_data()
    runs = [(s, p) for p in preset.workers for s in args.strategies if s != "sgd"]
    runs += [("sgd", 1)] if "sgd" in args.strategies else []  # one worker alone
    write_results([train(strategy, workers, preset, args, root) for strategy, workers in runs], args.out)


def parse(argv: list[str] | None) -> argparse.Namespace:
    """This script's arguments (also how ``resnet20_gpu.py`` builds its run)."""
    parser = driver.parser_for(__doc__)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--data-root", type=Path, default=driver.REPO / ".data", help="folder with train/ and test/")
    parser.add_argument(
        "--strategies",
        default=",".join(DEFAULT_STRATEGIES),
        type=driver.str_list,
        help=f"{', '.join(STRATEGIES)}, or all (default: {', '.join(DEFAULT_STRATEGIES)})",
    )
    parser.add_argument("--workers", type=driver.int_list, default=None, help="worker counts (default: the preset's)")
    parser.add_argument("--train-per-class", type=int, default=None, help="subset size (default: the preset's)")
    parser.add_argument("--test-per-class", type=int, default=None)
    parser.add_argument("--budget", type=float, default=None, help="seconds per run (default: the preset's)")
    parser.add_argument("--val-every", type=int, default=None, help="steps between evaluations (default: preset)")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: no limit)")
    parser.add_argument("--target-error", type=float, default=None, help="for 'time to error' (default: preset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default=None, help="default: the preset's")
    parser.add_argument("--cache-dir", type=Path, default=None, help="decoded-image cache (default: the app's)")
    parser.add_argument("--work-dir", type=Path, default=driver.REPO / ".data" / "reproduce-work", help="the subset")
    parser.add_argument("--timeout", type=float, default=300.0, help="collective timeout (s)")
    parser.add_argument("--deadline", type=float, default=None, help="give up on a run after this many seconds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "reproduce")
    parser.add_argument(
        "override",
        nargs="*",
        help="more app overrides, e.g. optim.lr=0.02 data.batch_size=64; lsgd:strategy.tau=4 for lsgd's runs only",
    )
    args = parser.parse_args(argv)
    if args.strategies == ["all"]:
        args.strategies = list(STRATEGIES)
    driver.check_known(parser, args.strategies, STRATEGIES, "strategies")
    return args


def main(argv: list[str] | None = None) -> None:
    driver.run("reproduce", parse(argv), argv, measure, report)


if __name__ == "__main__":
    main()
