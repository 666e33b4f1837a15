"""A bandwidth-limited cluster on one machine: one Linux network namespace per node.

    sudo python benchmarks/netcluster.py       # CPU-sized default: 4 nodes, CNN7, tau=16, 20 and 100 Mbit/s, ~12 min
    sudo python benchmarks/netcluster.py --rates 1gbit,100mbit,20mbit --configs floor,lsgd,dataparallel

Topology. A "switch" namespace holds a Linux bridge; each node is a namespace of its own with one veth pair to
the bridge and the address 10.213.0.<node+1>/24 (``--subnet``), which exists only inside these namespaces: nothing
is added to the machine's own network namespace and no traffic can leave. Every link is rate-limited in both
directions with ``tc``'s token bucket filter (``tbf``) at ``--rates`` (a full-duplex link of that rate per node).

Each node runs one worker: this script again (``--node``), started with ``ip netns exec`` and the plain Lightning
environment of a multi-node job (``NODE_RANK``, ``MASTER_ADDR`` = node 0's bridge address, ``MASTER_PORT``), gloo
bound to the node's interface (``GLOO_SOCKET_IFNAME``), ``Trainer(devices=1, num_nodes=N)``. The workers start
once and run the whole plan: every (rate, configuration) pair ``--repeats`` times, interleaved and rotated per repeat
(after one untimed warm-up fit); before each job this script sets the link rate and releases the workers through a
file. A job is one training epoch, a fresh ``Trainer.fit``, on CIFAR-shaped synthetic images (compute does not depend
on pixel values), batch ``--batch-size`` per node. Tables show medians over repeats.

What is measured, per job:

- epoch time: wall time of the training epoch (``on_train_epoch_start`` to ``on_train_epoch_end``), slowest node;
- bytes on the wire: each node's interface ``tx_bytes``/``rx_bytes`` over the epoch (whole frames: payload plus
  TCP/IP/Ethernet headers), read once the counters have settled after the epoch;
- for the Leader SGD variants, per round: the elected leader and the bytes its link sent from the start of that
  round to the start of the next (no other traffic happens in between), in model copies (4·d' bytes, d' =
  parameters + floating buffers). Gloo's ``broadcast`` is a tree in which the root sends several copies.

Configurations: ``floor`` (each node alone, no communication), ``lsgd``, ``easgd`` (both ``--tau``), ``dataparallel``,
and two options of ``LSGDStrategy``: ``lsgd-chain`` (``leader_broadcast="chain"``: the leader's weights travel as a
pipeline along a chain starting at the leader, so its link carries one copy) and ``lsgd-overlap``
(``overlap_steps=tau // 2``: the leader's weights travel as asynchronous broadcasts (the tree: the chain cannot run in
the background) while the workers keep training, and the pull is applied ``tau // 2`` steps later, toward weights
that are then ``tau // 2`` steps old: a different algorithm whose accuracy is not measured here). The epoch time of
``lsgd-overlap`` includes waiting for the last round's transfer. ``diloco`` (an all-reduce of the pseudo-gradients
every ``--tau`` steps) and ``streaming_diloco`` (min(4, tau) fragments at staggered steps, int8 codes all-gathered,
each outer step one step after its all-gather was posted) are the DiLoCo strategies at the same ``--tau``.

Writes ``netcluster.json`` (every node's record of every job; not committed), ``netcluster.csv`` (the medians per
rate and configuration) and ``meta.json`` (how it was run), then from the last two ``netcluster.md`` and
``netcluster.png``; ``python benchmarks/report.py DIR`` rewrites those. The cluster itself is ``netns.py``.

Needs Linux, root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and iproute2 (``ip``, ``tc``); without them it prints why and exits
0 without measuring. Every namespace it creates is deleted at the end, also on Ctrl-C or SIGTERM; namespaces left by
a run that was killed with SIGKILL are removed by the next run (their names carry the dead run's process id).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import driver
from netcluster_report import CONFIGS, LSGD_CONFIGS, Summary, report
from netns import cluster_up, counters, ready_to_measure, run_plan, serve_node, settled_counters


def _strategy(spec: dict[str, Any]) -> Any:
    from lsgd_lightning import (
        DataParallelStrategy,
        DiLoCoStrategy,
        EASGDStrategy,
        LSGDStrategy,
        StreamingDiLoCoStrategy,
    )

    timeout = timedelta(seconds=spec["timeout"])
    name, tau = spec["config"], spec["tau"]
    if name == "floor":
        return LSGDStrategy(tau=10**9, final_sync=False, timeout=timeout)
    if name == "lsgd":
        return LSGDStrategy(tau=tau, final_sync=False, timeout=timeout)
    if name == "easgd":
        return EASGDStrategy(tau=tau, final_sync=False, timeout=timeout)
    if name == "dataparallel":
        return DataParallelStrategy(timeout=timeout)
    if name == "diloco":
        return DiLoCoStrategy(tau=tau, final_sync=False, timeout=timeout)
    if name == "streaming_diloco":  # 4 fragments (at most tau), each outer step 1 step after its all-gather
        fragments, overlap = min(4, tau), min(1, tau - 1)
        return StreamingDiLoCoStrategy(
            tau=tau, fragments=fragments, overlap_steps=overlap, final_sync=False, timeout=timeout
        )
    if name == "lsgd-overlap":
        return LSGDStrategy(tau=tau, final_sync=False, timeout=timeout, overlap_steps=tau // 2)
    return LSGDStrategy(tau=tau, final_sync=False, timeout=timeout, leader_broadcast="chain")


def node_main(spec: dict[str, Any]) -> None:
    """One node: for each job of the plan, wait for its go file, train one epoch, write the measurements as JSON."""
    import warnings

    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from lsgd_lightning.models import ImageClassifier

    warnings.filterwarnings("ignore")
    torch.set_num_threads(spec["threads"])
    iface, tau = spec["iface"], spec["tau"]
    workdir = Path(spec["workdir"])

    class NetMeter(pl.Callback):
        def __init__(self, lsgd: bool) -> None:
            self.lsgd = lsgd
            self.step_ends: list[float] = []  # seconds since the epoch started, at the end of each step
            self.rounds: list[dict[str, Any]] = []
            self.round_starts: list[tuple[int, int]] = []
            self.seen_rounds = 0

        def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            self.start = (time.perf_counter(), *counters(iface), trainer.strategy.comm.bytes)

        def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
            if self.lsgd and (trainer.global_step + 1) % tau == 0:  # this step ends with a round
                self.round_starts.append(counters(iface))

        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            self.step_ends.append(time.perf_counter() - self.start[0])
            strategy = trainer.strategy
            if self.lsgd and strategy.comm.rounds > self.seen_rounds:
                self.seen_rounds = strategy.comm.rounds
                self.rounds.append({"leader": int(strategy.round_metrics["lsgd/leader"])})

        def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            strategy = trainer.strategy
            if self.lsgd:
                strategy.finish_transfer()  # an overlapped round's last transfer belongs to this epoch
            self.seconds = time.perf_counter() - self.start[0]
            self.comm = (strategy.comm.bytes - self.start[3], strategy.comm.seconds, strategy.comm.rounds)
            self.end = settled_counters(iface)
            bounds = [*self.round_starts, self.end]
            for k, record in enumerate(self.rounds):
                record["tx"] = bounds[k + 1][0] - bounds[k][0]
                record["rx"] = bounds[k + 1][1] - bounds[k][1]

    def epoch(config: str, samples: int) -> tuple[pl.Trainer, NetMeter]:
        pl.seed_everything(0, verbose=False)
        meter = NetMeter(config in LSGD_CONFIGS)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            num_nodes=spec["nodes"],
            strategy=_strategy({**spec, "config": config}),
            max_epochs=1,
            **driver.QUIET_TRAINER,
            num_sanity_val_steps=0,
            callbacks=[meter],
        )
        model = ImageClassifier(arch=spec["model"], image_size=spec["image_size"])
        generator = torch.Generator().manual_seed(0)
        size = spec["image_size"]
        data = TensorDataset(torch.randn(samples, 3, size, size, generator=generator), torch.randint(0, 10, (samples,)))
        trainer.fit(model, DataLoader(data, batch_size=spec["batch_size"]))
        return trainer, meter

    # Untimed: the first fit in a process pays one-off costs (process group, allocator, first iterations).
    epoch("floor", min(spec["samples"], 4 * spec["batch_size"] * spec["nodes"]))
    for k, job in enumerate(spec["plan"]):
        go = workdir / f"go-{k}"
        while not go.exists():
            time.sleep(0.05)
        trainer, meter = epoch(job["config"], spec["samples"])
        result = {
            "rank": trainer.global_rank,
            "steps": trainer.global_step,
            "epoch_s": meter.seconds,
            "tx": meter.end[0] - meter.start[1],
            "rx": meter.end[1] - meter.start[2],
            "comm_bytes": meter.comm[0],
            "comm_seconds": meter.comm[1],
            "rounds": meter.rounds,
            "step_ends": [round(t, 4) for t in meter.step_ends],
        }
        tmp = workdir / f".node{trainer.global_rank}-{k}.tmp"
        tmp.write_text(json.dumps(result))
        tmp.rename(workdir / f"node{trainer.global_rank}-{k}.json")


@dataclass
class Job:
    rate: str
    config: str
    repeat: int
    nodes: list[dict[str, Any]]

    @property
    def epoch_s(self) -> float:
        return max(node["epoch_s"] for node in self.nodes)

    def leader_copies(self, model_bytes: int) -> list[float]:
        """Per round: bytes the leader's link sent during that round, in model copies."""
        by_rank = {node["rank"]: node for node in self.nodes}
        rounds = by_rank[0]["rounds"]
        return [by_rank[r["leader"]]["rounds"][k]["tx"] / model_bytes for k, r in enumerate(rounds)]


def model_bytes(arch: str, image_size: int) -> int:
    """4·d': what one copy of the replica's floating-point state weighs (the payload of a leader broadcast)."""
    from lsgd_lightning.models import ImageClassifier

    model = ImageClassifier(arch=arch, image_size=image_size)
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if t.is_floating_point())


def summarize(jobs: list[Job], rates: list[str], configs: list[str], copy: int) -> list[Summary]:
    """Medians over repeats per (rate, configuration): what the report's tables and targets show."""
    summaries = []
    for rate in rates:
        group = [j for j in jobs if j.rate == rate]
        epoch = {c: statistics.median(j.epoch_s for j in group if j.config == c) for c in configs}
        for config in configs:
            own = [j for j in group if j.config == config]

            def median(key: str, over: Any = statistics.mean, own: list[Job] = own) -> float:
                return statistics.median(over(node[key] for node in j.nodes) for j in own)

            copies = [c for j in own for c in j.leader_copies(copy)] if config in LSGD_CONFIGS else []
            summaries.append(
                Summary(
                    rate,
                    config,
                    epoch[config],
                    epoch[config] / epoch["floor"] if "floor" in epoch else float("nan"),
                    epoch["dataparallel"] / epoch[config] if "dataparallel" in epoch else float("nan"),
                    median("tx"),
                    median("tx", max),
                    median("rx"),
                    median("comm_bytes"),
                    *((statistics.median(copies), min(copies), max(copies)) if copies else [float("nan")] * 3),
                )
            )
    return summaries


def measure(args: argparse.Namespace, meta: dict[str, Any]) -> None:
    """Every (rate, configuration) ``--repeats`` times on one emulated cluster; writes the records and the medians."""
    pairs = [{"rate": rate, "config": config} for rate in args.rates for config in args.configs]
    plan = []
    for repeat in range(args.repeats):  # every (rate, configuration) once per repeat, in a rotated order
        shift = (repeat * 5) % len(pairs)
        plan += [{**pair, "repeat": repeat} for pair in pairs[shift:] + pairs[:shift]]
    names = ("tau", "model", "batch_size", "samples", "image_size", "nodes", "threads", "timeout", "port")
    spec = {name: getattr(args, name) for name in names}
    with cluster_up(args.nodes, args.subnet) as cluster:
        results = run_plan(cluster, Path(__file__), spec, plan, args.work_dir, args.deadline)
    jobs = [Job(job["rate"], job["config"], job["repeat"], nodes) for job, nodes in zip(plan, results)]
    (args.out / "netcluster.json").write_text(json.dumps([j.__dict__ for j in jobs]))
    meta["model_copy_bytes"] = copy = model_bytes(args.model, args.image_size)
    meta["steps_per_node"] = jobs[0].nodes[0]["steps"]
    driver.write_rows(args.out / "netcluster.csv", Summary, summarize(jobs, args.rates, args.configs, copy))


def main(argv: list[str] | None = None) -> int:
    parser = driver.parser_for(__doc__)
    parser.add_argument("--node", help=argparse.SUPPRESS)  # internal: run one node's worker with this JSON spec
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument(
        "--rates",
        default="20mbit,100mbit",
        type=driver.str_list,
        help="link rates in tc syntax, e.g. 1gbit,100mbit,20mbit",
    )
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), type=driver.str_list, help=f"any of {', '.join(CONFIGS)}"
    )
    parser.add_argument("--model", default="cnn7")
    parser.add_argument("--tau", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128, help="per node (the paper's 128)")
    parser.add_argument("--samples", type=int, default=24576, help="training samples per epoch, all nodes together")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=2, help="every (rate, configuration) this many times")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per node")
    parser.add_argument("--subnet", default="10.213.0", help="first three octets of the namespaces' private /24")
    parser.add_argument("--port", type=int, default=29517, help="MASTER_PORT on node 0 (inside its namespace)")
    parser.add_argument("--timeout", type=float, default=300.0, help="collective timeout (s)")
    parser.add_argument("--deadline", type=float, default=900.0, help="give up on one job after this many seconds")
    parser.add_argument("--target-rate", default="20mbit", help="the link rate the targets are judged at")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "netcluster")
    parser.add_argument("--work-dir", type=Path, default=None, help="workers' logs and files (default: <out>/work)")
    args = parser.parse_args(argv)
    args.work_dir = args.work_dir or args.out / "work"
    if serve_node(args.node, node_main):
        return 0
    driver.check_known(parser, args.configs, CONFIGS, "configuration(s)")
    if args.nodes < 2 or not re.fullmatch(r"\d{1,3}\.\d{1,3}\.\d{1,3}", args.subnet):
        parser.error("needs --nodes >= 2 and --subnet like 10.213.0")
    if not ready_to_measure("netcluster", parser, args.rates, measuring=args.report_only is None):
        return 0
    driver.run("netcluster", args, argv, measure, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
