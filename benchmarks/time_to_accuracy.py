"""The paper's claim where it can be seen: test error against wall-clock time on a bandwidth-limited cluster.

    mkdir -p ~/.cache/cifar10 && tar xzf cifar10-jpeg.tar.gz -C ~/.cache/cifar10   # train/<class>/*, test/<class>/*
    sudo python benchmarks/time_to_accuracy.py --data-root ~/.cache/cifar10         # the grid: 5 x 3 runs, ~2 h
    python benchmarks/time_to_accuracy.py --report-only benchmarks/results/time_to_accuracy

The cluster is ``netns.py``'s (the one ``netcluster.py`` measures): ``--nodes`` network namespaces on a bridge, every
link limited to ``--rate`` in both directions by ``tc tbf``, one worker process per node (``Trainer(devices=1,
num_nodes=N)``, gloo bound to the node's interface, ``--threads`` torch threads each). 20 Mbit/s gives this CPU's
compute-to-communication ratio about that of GPUs on Ethernet (CNN7: ~1.4 MB per model copy, ~0.5 s on the wire).

The paper's CNN7 protocol (the app's ``experiment=cifar10_cnn7`` preset, built with the app's own builders): all
50,000 CIFAR-10 training images, random 28x28 crops with horizontal flips, the 28x28 centre crop for testing, batch
128 per worker, Nesterov SGD (momentum 0.9, lr 0.05), weight decay 1e-4; the preset's LR drops (epochs 100 and 150)
lie far beyond the budget and are left out (``optim.milestones=[]``). Strategy settings are the app's defaults
(``conf/strategy/*.yaml``): τ = 16 for LSGD and EASGD, DOWNPOUR its preset (τ = 1, pushes scaled by 1/P); LSGD's
pull strength λ = 0.1 and leader window 10 (the authors' code, see DESIGN.md); EASGD's β = 0.9 (α = β/P, the EASGD
paper). Strategies (``--strategies``):

- ``lsgd``: ``LSGDStrategy``, blocking rounds; evaluated model: ``--lsgd-eval-on`` (default :data:`LSGD_EVAL_ON`);
- ``lsgd-overlap``: the same with ``overlap_steps = τ/2`` (the leader's weights travel while training goes on);
- ``easgd``: the centre variable is evaluated; ``downpour``: the held parameters; ``dataparallel``: the model.

Each (strategy, seed) run gets the same ``--budget`` of training time: wall time since ``fit`` started, minus the
time spent evaluating. Every ``--check-every`` optimizer steps (default τ, so that for the periodic strategies the
check lands on a round) all nodes agree by one all-reduce of their training clocks (8 bytes, the maximum) whether an
evaluation is due (one per ``--eval-every`` seconds of training time) or the budget is spent. An evaluation swaps the
strategy's evaluation model into every node (as Lightning's validation does), and the nodes test it on the full test
split together (node i takes images i, i+N, ...; the counts are all-reduced): the test error of the evaluated model on
all 10,000 images. Its time and its traffic do not count against the budget or the bytes; an overlapped LSGD round
still in flight when an evaluation is due is waited for first and counted as training (before this was so, the
recorded grid's ``lsgd-overlap`` runs dropped those rounds' bytes and wait, RESULTS.md section 6). Evaluations fall
up to ``--check-every`` steps after their mark; each point records its own training time, step and epoch. For
DOWNPOUR, asynchronous by design, the check is a synchronization point the algorithm does not have (every τ steps;
on nodes of equal speed it costs one small all-reduce).

Per run, rank 0 records (training seconds, wall seconds, step, epoch, test error) at every evaluation, and every node
its interface's bytes sent and received during training (whole frames, counted up to the last evaluation;
evaluation traffic subtracted, the final sync after training left out) and the strategy's payload meter. Each
finished run is written to ``<out>/runs/<strategy>-seed<k>.json`` at once, with the load average before and after
it; a rerun skips the runs whose file exists (the grid can be run in parts, or a disturbed run deleted and rerun).
Then ``time_to_accuracy_curves.csv`` and ``time_to_accuracy_runs.csv`` are rebuilt from all run files and the report
(``time_to_accuracy.md``, ``time_to_accuracy.png``) written from those; ``--report-only DIR`` (or
``python benchmarks/report.py DIR``) rewrites it without training.

Needs root and iproute2 for the namespaces; ``--network loopback`` runs the same nodes as plain processes on
127.0.0.1 without any rate limit (a pipeline check only: no wire bytes, no network effect). Timing runs belong on a
quiet machine: nothing else running.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import driver
from netns import Loopback, cluster_up, counters, ready_to_measure, run_plan, serve_node
from time_to_accuracy_report import CURVES, RUNS, STRATEGIES, CurvePoint, RunRow, report

# The model LSGD's curves evaluate: the workers' average, what the paper plots (DESIGN.md, "What the LSGD paper
# evaluates"); CNN7 has no BatchNorm, so nothing is re-estimated.
LSGD_EVAL_ON = "average"
TAU = 16  # the app's default τ (conf/strategy/lsgd.yaml, easgd.yaml); DOWNPOUR keeps its preset (τ = 1, push 1/P)


def strategy_overrides(name: str, lsgd_eval_on: str, tau: int) -> list[str]:
    """The app overrides that pick strategy ``name`` (one of :data:`STRATEGIES`)."""
    if name in ("lsgd", "lsgd-overlap"):
        extra = [f"strategy.overlap_steps={tau // 2}"] if name == "lsgd-overlap" else []
        return ["strategy=lsgd", f"strategy.tau={tau}", f"strategy.eval_on={lsgd_eval_on}", *extra]
    if name == "easgd":
        return [f"strategy={name}", f"strategy.tau={tau}"]
    if name == "downpour":  # its weights by RPC over TCP only: shared memory would bypass the emulated links
        return [f"strategy={name}", "strategy.rpc_options={_transports:[uv],_channels:[basic]}"]
    return [f"strategy={name}"]


def run_overrides(args: argparse.Namespace, name: str, seed: int, root: Path) -> list[str]:
    """The whole configuration of one run, as ``lsgd-train`` overrides on the ``cifar10_cnn7`` preset."""
    overrides = ["experiment=cifar10_cnn7", "data=imagefolder", f"data.root={root}", *driver.CIFAR_NORMALIZATION]
    overrides += ["optim.milestones=[]", "trainer.max_epochs=100000", "logger=none", f"seed={seed}"]
    overrides += [*strategy_overrides(name, args.lsgd_eval_on, args.tau), f"strategy.timeout_s={args.timeout:g}"]
    if args.cache_dir:
        overrides.append(f"data.cache_dir={args.cache_dir}")
    return overrides + list(args.override)


def run_name(strategy: str, seed: int) -> str:
    return f"{strategy}-seed{seed}"


# ----------------------------------------------------------------------------------------------------------------
# One node of one run (inside its namespace)
# ----------------------------------------------------------------------------------------------------------------


def node_main(spec: dict[str, Any]) -> None:
    """Wait for the run's go file, train until the budget is spent, write this node's record as JSON."""
    import lightning.pytorch as pl
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, Subset

    from lsgd_lightning.train import build_datamodule, build_model, build_strategy

    driver.quiet_warnings()
    warnings.filterwarnings("ignore", message=r".*no `val_dataloader`.*")  # evaluations run in Clock, not Lightning
    torch.set_num_threads(spec["threads"])
    iface, workdir, job = spec["iface"], Path(spec["workdir"]), spec["plan"][0]
    wire = spec["network"] == "netns"

    class Clock(pl.Callback):
        """Training time (evaluation excluded), evaluations at fixed marks, the budget; all nodes decide together."""

        def __init__(self) -> None:
            self.points: list[dict[str, float]] = []
            self.eval_s = 0.0
            self.eval_tx = self.eval_rx = 0
            self.eval_payload = 0
            self.next_mark = spec["eval_every"]
            self.end_counters: tuple[int, int] | None = None  # at the stop: the end of the training traffic
            self.end_payload = 0

        def train_s(self) -> float:
            return time.perf_counter() - self.start - self.eval_s

        def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            self.test = DataLoader(Subset(test_set, range(trainer.global_rank, len(test_set), trainer.world_size)),
                                   batch_size=spec["eval_batch_size"])  # fmt: skip
            self.epoch_steps = len(train_set) / (spec["batch_size"] * trainer.world_size)
            self.tx0, self.rx0 = counters(iface)
            self.start = time.perf_counter()
            self.evaluate(trainer, module, 0.0)  # the common starting point

        def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
            if trainer.global_step % spec["check_every"]:
                return
            clock = torch.tensor([self.train_s()], dtype=torch.float64)
            dist.all_reduce(clock, op=dist.ReduceOp.MAX)  # every node takes the same decision
            train_s = float(clock)
            if train_s >= self.next_mark or train_s >= spec["budget"]:
                self.evaluate(trainer, module, train_s)
                self.next_mark = (math.floor(train_s / spec["eval_every"]) + 1) * spec["eval_every"]
            if train_s >= spec["budget"]:
                trainer.should_stop = True
                # the training traffic ends here: the final sync after fit is neither training nor evaluation
                self.end_counters, self.end_payload = counters(iface), _payload(trainer)

        def evaluate(self, trainer: pl.Trainer, module: pl.LightningModule, train_s: float) -> None:
            # An overlapped round still in flight is training traffic and training time: let it land before the
            # evaluation's accounting starts (else its bytes and its wait count as evaluation and are dropped).
            finish_transfer = getattr(trainer.strategy, "finish_transfer", None)
            if finish_transfer is not None:
                finish_transfer()
            begin, (tx, rx), payload = time.perf_counter(), counters(iface), _payload(trainer)
            strategy = trainer.strategy
            strategy.on_validation_start()  # the evaluation model swapped in (a collective), as in validation
            module.eval()
            counts = torch.zeros(2, dtype=torch.float64)
            with torch.no_grad():
                for x, y in self.test:
                    counts += torch.tensor([(module(x).argmax(1) == y).sum().item(), len(y)], dtype=torch.float64)
            module.train()
            strategy.on_validation_end()
            dist.all_reduce(counts)
            end_tx, end_rx = counters(iface)
            self.eval_tx, self.eval_rx = self.eval_tx + end_tx - tx, self.eval_rx + end_rx - rx
            self.eval_payload += _payload(trainer) - payload
            now = time.perf_counter()
            step = trainer.global_step
            self.points.append(
                {"train_s": train_s, "wall_s": now - self.start, "step": step, "epoch": step / self.epoch_steps,
                 "error": 1.0 - float(counts[0] / counts[1]), "eval_s": now - begin}
            )  # fmt: skip
            self.eval_s += now - begin

    go = workdir / "go-0"
    while not go.exists():
        time.sleep(0.05)
    cfg = driver.compose(job["overrides"])
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    train_set, test_set = datamodule.train_set, datamodule.test_set
    clock = Clock()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        num_nodes=spec["nodes"],
        strategy=build_strategy(cfg),
        max_epochs=cfg.trainer.max_epochs,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        **driver.QUIET_TRAINER,
        callbacks=[clock],
    )
    trainer.fit(build_model(cfg, datamodule), train_dataloaders=datamodule.train_dataloader())
    if clock.end_counters is None:  # fit ended before the budget (max_epochs): the traffic up to now
        clock.end_counters, clock.end_payload = counters(iface), _payload(trainer)
    tx, rx = clock.end_counters
    result = {
        "rank": trainer.global_rank,
        "steps": trainer.global_step,
        "train_s": clock.points[-1]["train_s"],
        "tx": tx - clock.tx0 - clock.eval_tx if wire else float("nan"),
        "rx": rx - clock.rx0 - clock.eval_rx if wire else float("nan"),
        "payload": clock.end_payload - clock.eval_payload,
        "rounds": float(getattr(getattr(trainer.strategy, "comm", None), "rounds", 0)),
        "points": clock.points if trainer.global_rank == 0 else [],
    }
    tmp = workdir / f".node{trainer.global_rank}-0.tmp"
    tmp.write_text(json.dumps(result))
    tmp.rename(workdir / f"node{trainer.global_rank}-0.json")


def _payload(trainer: Any) -> int:
    """The strategy's payload meter (bytes this node sent through its collectives), 0 without one."""
    comm = getattr(trainer.strategy, "comm", None)
    return int(comm.bytes) if comm is not None else 0


# ----------------------------------------------------------------------------------------------------------------
# The orchestrator
# ----------------------------------------------------------------------------------------------------------------


def run_record(args: argparse.Namespace, job: dict[str, Any], nodes: list[dict[str, Any]], load: str) -> dict:
    """What ``runs/<strategy>-seed<k>.json`` keeps of one run."""
    by_rank = sorted(nodes, key=lambda node: node["rank"])
    return {
        "strategy": job["config"],
        "seed": job["seed"],
        "nodes": args.nodes,
        "rate": args.rate if args.network == "netns" else "loopback (no limit)",
        "budget_s": args.budget,
        "overrides": job["overrides"],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": driver.git_commit(),
        "load_before": load,
        "load_after": driver.load_average(),
        "steps": by_rank[0]["steps"],
        "train_s": by_rank[0]["train_s"],
        "tx_bytes": [node["tx"] for node in by_rank],
        "rx_bytes": [node["rx"] for node in by_rank],
        "payload_bytes": [node["payload"] for node in by_rank],
        "rounds": by_rank[0]["rounds"],
        "points": by_rank[0]["points"],
    }


def collect(out: Path) -> None:
    """Rebuild the two CSV files the report reads from every stored run file."""
    records = [json.loads(path.read_text()) for path in sorted((out / "runs").glob("*.json"))]
    curves = [
        CurvePoint(r["strategy"], r["seed"], p["train_s"], p["wall_s"], p["step"], p["epoch"], p["error"])
        for r in records
        for p in r["points"]
    ]
    driver.write_rows(out / CURVES, CurvePoint, curves)
    rows = []
    for r in records:
        tx, payload = r["tx_bytes"], r["payload_bytes"]
        last = r["points"][-1]
        rows.append(
            RunRow(r["strategy"], r["seed"], r["steps"], last["epoch"], r["train_s"], last["error"],
                   sum(tx) / len(tx), max(tx), sum(payload) / len(payload), r["rounds"], r["rate"],
                   r["load_before"], r["load_after"], r["date"])
        )  # fmt: skip
    driver.write_rows(out / RUNS, RunRow, rows)


def measure(args: argparse.Namespace, meta: dict[str, Any]) -> None:
    """Every unfinished (strategy, seed) run, one after another on one cluster; then the CSV files from all runs."""
    from reproduce import make_subset  # here: importing it imports Lightning

    root = make_subset(args.data_root.resolve(), args.work_dir / "subset", args.train_per_class, args.test_per_class)
    meta["data"] = (
        f"{args.train_per_class or 'all'} train / {args.test_per_class or 'all'} test images per class of "
        f"`{args.data_root}`"
    )
    meta["lsgd_eval_on"] = args.lsgd_eval_on
    runs_dir = args.out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    plan = [
        {"config": s, "seed": k, "rate": args.rate, "overrides": run_overrides(args, s, k, root)}
        for k in args.seeds  # seed by seed: a grid cut short still has every strategy at the first seeds
        for s in args.strategies
        if not (runs_dir / f"{run_name(s, k)}.json").exists()
    ]
    done = len(args.seeds) * len(args.strategies) - len(plan)
    print(f"time_to_accuracy: {len(plan)} run(s) to do, {done} already stored in {runs_dir}", flush=True)
    if plan:
        from lsgd_lightning.local_job import free_port
        from lsgd_lightning.train import build_datamodule

        build_datamodule(driver.compose(plan[0]["overrides"])).prepare_data()  # decode and cache once, here
        names = ("nodes", "threads", "budget", "eval_every", "check_every", "batch_size", "eval_batch_size", "network")
        spec = {name: getattr(args, name) for name in names}
        deadline = 2 * args.budget + args.deadline
        cluster_context = cluster_up(args.nodes, args.subnet) if args.network == "netns" else _loopback(args.nodes)
        with cluster_context as cluster:
            for k, job in enumerate(plan):
                port = args.port + k % 100 if args.network == "netns" else free_port()
                load = driver.load_average()
                workdir = args.work_dir / run_name(job["config"], job["seed"])
                spec["port"] = port
                nodes = run_plan(cluster, Path(__file__), spec, [job], workdir, deadline, _progress)[0]
                record = run_record(args, job, nodes, load)
                tmp = runs_dir / f".{run_name(job['config'], job['seed'])}.tmp"
                tmp.write_text(json.dumps(record, indent=1) + "\n")
                tmp.rename(runs_dir / f"{run_name(job['config'], job['seed'])}.json")
    collect(args.out)


class _loopback:
    """``cluster_up``'s counterpart without namespaces."""

    def __init__(self, nodes: int) -> None:
        self.cluster = Loopback(nodes)

    def __enter__(self) -> Loopback:
        return self.cluster

    def __exit__(self, *exc: object) -> None:
        return None


def _progress(k: int, job: dict[str, Any], nodes: list[dict[str, Any]]) -> str:
    rank0 = min(nodes, key=lambda node: node["rank"])
    last = rank0["points"][-1]
    return (
        f"time_to_accuracy: {job['config']:<13} seed {job['seed']}: {rank0['steps']} steps ({last['epoch']:.2f} "
        f"epochs) in {last['train_s']:.0f} s of training, test error {last['error'] * 100:.1f}%"
    )


def main(argv: list[str] | None = None) -> int:
    parser = driver.parser_for(__doc__)
    parser.add_argument("--node", help=argparse.SUPPRESS)  # internal: run one node's worker with this JSON spec
    parser.add_argument("--data-root", type=Path, default=driver.REPO / ".data", help="folder with train/ and test/")
    parser.add_argument("--strategies", type=driver.str_list, default=",".join(STRATEGIES), help=", ".join(STRATEGIES))
    parser.add_argument("--seeds", type=driver.int_list, default=[0, 1, 2])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rate", default="20mbit", help="link rate in tc syntax (every link, both directions)")
    parser.add_argument("--network", choices=("netns", "loopback"), default="netns", help="loopback: no limit")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds of training time per run")
    parser.add_argument("--eval-every", type=float, default=30.0, help="seconds of training time between tests")
    parser.add_argument("--check-every", type=int, default=TAU, help="steps between the nodes' clock checks")
    parser.add_argument("--tau", type=int, default=TAU, help="τ of lsgd, lsgd-overlap and easgd")
    parser.add_argument("--lsgd-eval-on", default=LSGD_EVAL_ON, help="the model LSGD's curves evaluate")
    parser.add_argument("--batch-size", type=int, default=128, help="per node (the paper's 128)")
    parser.add_argument("--eval-batch-size", type=int, default=500)
    parser.add_argument("--train-per-class", type=int, default=None, help="a subset (default: all 5,000)")
    parser.add_argument("--test-per-class", type=int, default=None, help="a subset (default: all 1,000)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per node")
    parser.add_argument("--cache-dir", type=Path, default=None, help="decoded-image cache (default: the app's)")
    parser.add_argument("--subnet", default="10.214.0", help="first three octets of the namespaces' private /24")
    parser.add_argument("--port", type=int, default=29617, help="MASTER_PORT on node 0 (plus the run's index)")
    parser.add_argument("--timeout", type=float, default=600.0, help="collective timeout (s)")
    parser.add_argument("--deadline", type=float, default=900.0, help="a run may take 2 x budget + this (s)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "time_to_accuracy")
    parser.add_argument("--work-dir", type=Path, default=None, help="workers' logs and files (default: <out>/work)")
    parser.add_argument("override", nargs="*", help="more app overrides for every run, e.g. data.num_workers=1")
    args = parser.parse_args(argv)
    args.work_dir = args.work_dir or args.out / "work"
    if serve_node(args.node, node_main):
        return 0
    driver.check_known(parser, args.strategies, STRATEGIES, "strategies")
    if args.nodes < 2 or args.budget <= 0 or args.eval_every <= 0 or args.check_every < 1 or args.tau < 2:
        parser.error("needs --nodes >= 2, --budget > 0, --eval-every > 0, --check-every >= 1 and --tau >= 2")
    args.override += [f"data.batch_size={args.batch_size}", f"data.eval_batch_size={args.eval_batch_size}"]
    if args.report_only is None and {"lsgd", "lsgd-overlap"} & set(args.strategies):
        from lsgd_lightning import LSGDStrategy  # here: importing the package imports Lightning

        if args.lsgd_eval_on not in LSGDStrategy.evaluated_models():
            parser.error(f"--lsgd-eval-on: LSGDStrategy evaluates one of {LSGDStrategy.evaluated_models()}")
    measuring = args.report_only is None and args.network == "netns"
    if not ready_to_measure("time_to_accuracy", parser, [args.rate], measuring, hint=" (or pass --network loopback)"):
        return 0
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    driver.run("time_to_accuracy", args, argv, measure, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
