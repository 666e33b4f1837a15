"""A bandwidth-limited cluster on one machine: one Linux network namespace per node (issue 6, item 2).

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
pipeline along a chain starting at the leader, so its link carries one copy) and ``lsgd-overlap`` (additionally
``overlap_steps=tau // 2``: that chain runs in the background while the workers keep training, and the pull is
applied ``tau // 2`` steps later, toward weights that are then ``tau // 2`` steps old: a different algorithm whose
accuracy is not measured here). The epoch time of ``lsgd-overlap`` includes waiting for the last round's transfer.

Needs Linux, root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and iproute2 (``ip``, ``tc``); without them it prints why and exits
0 without measuring. Every namespace it creates is deleted at the end, also on Ctrl-C or SIGTERM; namespaces left by
a run that was killed with SIGKILL are removed by the next run (their names carry the dead run's process id).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

NS_PREFIX = "lsgdnc"  # namespace names: lsgdnc<pid>s (switch), lsgdnc<pid>n<i> (node i)
RATE_RE = re.compile(r"^\d+(\.\d+)?(bit|kbit|mbit|gbit)$", re.IGNORECASE)
CONFIGS = ("floor", "lsgd", "easgd", "dataparallel", "lsgd-chain", "lsgd-overlap")
LSGD_CONFIGS = ("lsgd", "lsgd-chain", "lsgd-overlap")
LAUNCH_VARS = ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
LAUNCH_VARS += ("MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED", "TORCHELASTIC_RUN_ID", "GLOO_SOCKET_IFNAME")


# ====================================================================================================================
# The cluster: namespaces, veth pairs, bridge, tbf
# ====================================================================================================================


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {result.stderr.strip() or result.stdout.strip()}")
    return result


def missing_capability() -> str | None:
    """Why this machine cannot run the emulated cluster, or ``None`` if it can (probed with a throw-away namespace)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN); run it with sudo"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found: install iproute2 (apt-get install iproute2)"
    probe = f"{NS_PREFIX}{os.getpid()}probe"
    try:
        added = _run("ip", "netns", "add", probe, check=False)
        if added.returncode != 0:
            return f"cannot create a network namespace (`ip netns add`: {added.stderr.strip()})"
        steps = [
            ("ip", "-n", probe, "link", "add", "pa", "type", "veth", "peer", "name", "pb"),
            ("tc", "-n", probe, "qdisc", "add", "dev", "pa", "root", "tbf", "rate", "20mbit", "burst", "32kb",
             "latency", "100ms"),
        ]  # fmt: skip
        for cmd in steps:
            result = _run(*cmd, check=False)
            if result.returncode != 0:
                return f"`{' '.join(cmd[3:])}` failed in a namespace: {result.stderr.strip()}"
    finally:
        _run("ip", "netns", "del", probe, check=False)
    return None


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces left by earlier runs of this script that were killed outright (their pid is gone)."""
    listed = _run("ip", "netns", "list", check=False).stdout
    removed = []
    for name in re.findall(rf"^({NS_PREFIX}(\d+)\S*)", listed, flags=re.MULTILINE):
        ns, pid = name[0], int(name[1])
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            _run("ip", "netns", "del", ns, check=False)
            removed.append(ns)
    return removed


@dataclass
class Cluster:
    """N node namespaces on one bridge (in a switch namespace), every link limited by tbf in both directions."""

    nodes: int
    subnet: str = "10.213.0"
    tag: str = field(default_factory=lambda: f"{NS_PREFIX}{os.getpid()}")
    created: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"{self.tag}s"

    def node(self, i: int) -> str:
        return f"{self.tag}n{i}"

    def iface(self, i: int) -> str:
        return f"nc{i}"

    def address(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    def _add_namespace(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self.created.append(name)  # recorded at once: a failure later still deletes it

    def up(self) -> None:
        self._add_namespace(self.switch)
        _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.switch, "link", "set", "br0", "up")
        for i in range(self.nodes):
            ns, port = self.node(i), f"pt{i}"
            self._add_namespace(ns)
            _run("ip", "link", "add", self.iface(i), "netns", ns, "type", "veth", "peer", "name", port,
                 "netns", self.switch)  # fmt: skip
            _run("ip", "-n", self.switch, "link", "set", port, "master", "br0")
            _run("ip", "-n", self.switch, "link", "set", port, "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", self.iface(i))
            _run("ip", "-n", ns, "link", "set", self.iface(i), "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")

    def set_rate(self, rate: str) -> None:
        """Limit every link to ``rate`` (tc syntax, e.g. 20mbit) in both directions: node egress and switch port."""
        bits = _rate_bits(rate)
        burst = max(32 * 1024, int(bits / 8 / 250))  # at least rate/HZ (HZ <= 250 here) and a few full frames
        for i in range(self.nodes):
            for ns, dev in ((self.node(i), self.iface(i)), (self.switch, f"pt{i}")):
                _run("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst",
                     str(burst), "latency", "100ms")  # fmt: skip

    def down(self) -> None:
        """Delete every namespace this cluster created (their veth pairs and the bridge go with them)."""
        for name in reversed(self.created):
            _run("ip", "netns", "del", name, check=False)
        self.created.clear()


def _rate_bits(rate: str) -> float:
    match = RATE_RE.match(rate)
    if not match:
        raise ValueError(f"link rate {rate!r}: use tc syntax such as 20mbit, 100mbit, 1gbit")
    unit = match.group(2).lower()
    scale = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}[unit]
    return float(rate[: -len(unit)]) * scale


class Interrupted(Exception):
    """SIGTERM/SIGHUP turned into an exception, so that ``finally`` blocks clean up as on Ctrl-C."""


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(f"signal {signum}")


# ====================================================================================================================
# Running one job: a worker per node, each in its namespace
# ====================================================================================================================


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(extra)
    return env


def run_plan(cluster: Cluster, spec: dict[str, Any], plan: list[dict[str, str]], workdir: Path,
             deadline_s: float) -> list[list[dict[str, Any]]]:  # fmt: skip
    """Start one worker per node namespace, once, and run the jobs of ``plan`` one after another.

    The workers stay up for the whole plan (one start-up, one process group). Before job k the link rate is set
    here, then the file ``go-k`` releases the workers; each writes ``node<i>-<k>.json`` when its epoch is done.
    Every job has a deadline; a worker that fails or a job that runs past its deadline stops everything.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in [*workdir.glob("go-*"), *workdir.glob("node*.json")]:
        stale.unlink()
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    cluster.set_rate(plan[0]["rate"])
    try:
        for i in range(cluster.nodes):
            node_spec = {
                **spec,
                "plan": plan,
                "iface": cluster.iface(i),
                "workdir": str(workdir),
                "parent": os.getpid(),
            }
            env = _clean_env(
                NODE_RANK=str(i),
                MASTER_ADDR=cluster.address(0),
                MASTER_PORT=str(spec["port"]),
                GLOO_SOCKET_IFNAME=cluster.iface(i),
                OMP_NUM_THREADS=str(spec["threads"]),
                PYTHONUNBUFFERED="1",
            )
            log = open(workdir / f"node{i}.log", "wb")  # noqa: SIM115 (closed in finally)
            logs.append(log)
            cmd = ["ip", "netns", "exec", cluster.node(i), sys.executable, __file__, "--node", json.dumps(node_spec)]
            # Ctrl-C between the fork and the append would leak a worker that `_stop` never sees: hold the signals
            # (the child inherits the mask; the worker unblocks them first thing).
            held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
            try:
                procs.append(
                    subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                )
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
        results = []
        for k, job in enumerate(plan):
            cluster.set_rate(job["rate"])
            (workdir / f"go-{k}").write_text("")
            files = [workdir / f"node{i}-{k}.json" for i in range(cluster.nodes)]
            end = time.monotonic() + deadline_s
            while not all(f.exists() for f in files):
                failed = [i for i, p in enumerate(procs) if p.poll() is not None]
                if failed or time.monotonic() > end:
                    what = f"node {failed[0]} exited" if failed else f"the job ran past its {deadline_s:.0f} s deadline"
                    tail = (workdir / f"node{failed[0] if failed else 0}.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{job['config']} at {job['rate']}: {what}; its log ends with:\n{tail}")
                time.sleep(0.2)
            results.append([json.loads(f.read_text()) for f in files])
            epoch = max(node["epoch_s"] for node in results[-1])
            print(f"netcluster: job {k + 1}/{len(plan)}: {job['rate']:>8} {job['config']:<13} epoch {epoch:6.1f} s",
                  flush=True)  # fmt: skip
        return results
    finally:
        _stop(procs)
        for log in logs:
            log.close()


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Terminate the workers this script started (each leads its own session), then kill what is left."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


# ====================================================================================================================
# The node worker (runs inside a namespace): strategies, measurement callback
# ====================================================================================================================


def _strategy(spec: dict[str, Any]) -> Any:
    from lsgd_lightning import DataParallelStrategy, EASGDStrategy, LSGDStrategy

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
    overlap = tau // 2 if name == "lsgd-overlap" else 0
    return LSGDStrategy(tau=tau, final_sync=False, timeout=timeout, leader_broadcast="chain", overlap_steps=overlap)


def _counters(iface: str) -> tuple[int, int]:
    base = Path("/sys/class/net") / iface / "statistics"
    return int((base / "tx_bytes").read_text()), int((base / "rx_bytes").read_text())


def _settled_counters(iface: str, quiet_s: float = 0.3, limit_s: float = 20.0) -> tuple[int, int]:
    """The interface counters once nothing has moved for ``quiet_s`` (data still queued in tbf or sockets)."""
    last, since, end = _counters(iface), time.monotonic(), time.monotonic() + limit_s
    while time.monotonic() < end:
        time.sleep(0.05)
        now = _counters(iface)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return last


def _exit_with_parent(parent: int) -> None:
    """End this worker as soon as the orchestrator ``parent`` is gone (even after SIGKILL): never wait forever.

    ``ip netns exec`` replaces itself with this process, so its parent is the orchestrator; when that dies this
    process is re-parented and ``getppid`` changes.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


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
            self.start = (time.perf_counter(), *_counters(iface), trainer.strategy.comm.bytes)

        def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
            if self.lsgd and (trainer.global_step + 1) % tau == 0:  # this step ends with a round
                self.round_starts.append(_counters(iface))

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
            self.end = _settled_counters(iface)
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
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
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


# ====================================================================================================================
# Orchestration and report
# ====================================================================================================================


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


def report(jobs: list[Job], args: argparse.Namespace, meta: dict[str, str]) -> str:
    from _common import load_average, markdown_table, metadata_markdown

    copy = model_bytes(args.model, args.image_size)
    steps = jobs[0].nodes[0]["steps"]
    sections, verdicts, plot = [], [], {}
    for rate in args.rates:
        group = [j for j in jobs if j.rate == rate]
        epoch = {c: statistics.median(j.epoch_s for j in group if j.config == c) for c in args.configs}
        floor = epoch.get("floor")
        rows = []
        for config in args.configs:
            own = [j for j in group if j.config == config]
            tx = statistics.median(statistics.mean(n["tx"] for n in j.nodes) for j in own)
            tx_max = statistics.median(max(n["tx"] for n in j.nodes) for j in own)
            rx = statistics.median(statistics.mean(n["rx"] for n in j.nodes) for j in own)
            payload = statistics.median(statistics.mean(n["comm_bytes"] for n in j.nodes) for j in own)
            copies = [c for j in own for c in j.leader_copies(copy)] if config in LSGD_CONFIGS else []
            rows.append(
                [
                    config,
                    f"{epoch[config]:.1f}",
                    "n/a" if floor is None else f"{epoch[config] / floor:.2f}",
                    f"{tx / 1e6:.2f} / {tx_max / 1e6:.2f}",
                    f"{rx / 1e6:.2f}",
                    f"{tx / copy:.1f}",
                    f"{payload / 1e6:.2f}",
                    f"{statistics.median(copies):.2f} ({min(copies):.2f}-{max(copies):.2f})" if copies else "",
                ]
            )
            plot.setdefault(rate, {})[config] = (epoch[config], tx / 1e6)
        header = ["configuration", "epoch s", "ratio to floor", "tx MB/node (mean / max)", "rx MB/node"]
        header += ["tx in model copies", "payload MB/node (comm meter)", "leader link: copies/round (range)"]
        sections.append(f"### {rate} links\n\n" + markdown_table(header, rows))
        if rate == args.target_rate:
            verdicts += _verdicts(rate, epoch, group, copy, args)

    meta["load_end"] = load_average()
    settings = (
        f"{args.nodes} nodes (one worker each, {args.threads} thread(s)), {args.model}, tau={args.tau}, batch "
        f"{args.batch_size} per node, {args.samples} samples per epoch ({steps} steps per node), {args.repeats} "
        f"repeat(s); one model copy = 4·d' = {copy:,} bytes"
    )
    text = (
        "## Bandwidth-limited cluster (network namespaces, tbf)\n\n"
        + metadata_markdown(meta)
        + f"- settings: {settings}\n\n"
        + "\n".join(sections)
        + f"\n### Targets (at {args.target_rate}; epoch times are medians over repeats)\n\n"
        + (markdown_table(["target", "measured", "verdict"], verdicts) if verdicts else "not measured at that rate\n")
    )
    _plot(plot, args.out / "netcluster.png", args)
    return text


def _verdicts(
    rate: str, epoch: dict[str, float], group: list[Job], copy: int, args: argparse.Namespace
) -> list[list[str]]:
    rows = []
    if "floor" not in epoch:
        return rows
    for config in (c for c in LSGD_CONFIGS if c in epoch):
        ratio = epoch[config] / epoch["floor"]
        rows.append(
            [f"{rate}: {config} within 1.2x of the floor", f"{ratio:.3f}x", "met" if ratio <= 1.2 else "missed"]
        )
        if "dataparallel" in epoch:
            speedup = epoch["dataparallel"] / epoch[config]
            rows.append(
                [
                    f"{rate}: {config} at least 5x faster per epoch than DataParallel",
                    f"{speedup:.2f}x",
                    "met" if speedup >= 5 else "missed",
                ]
            )
        copies = [c for j in group if j.config == config for c in j.leader_copies(copy)]
        if copies:
            median = statistics.median(copies)
            rows.append(
                [
                    f"{rate}: {config} leader's link carries about one model copy per round",
                    f"{median:.2f} copies (wire bytes incl. headers)",
                    "met" if median <= 1.15 else "missed",
                ]
            )
    return rows


def _plot(plot: dict[str, dict[str, tuple[float, float]]], path: Path, args: argparse.Namespace) -> None:
    from _common import pyplot

    plt = pyplot()
    if plt is None or not plot:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    width = 0.8 / len(plot)
    for k, (rate, entry) in enumerate(plot.items()):
        xs = [i + k * width for i in range(len(entry))]
        axes[0].bar(xs, [v[0] for v in entry.values()], width, label=rate)
        axes[1].bar(xs, [v[1] for v in entry.values()], width, label=rate)
    for axis, title in zip(axes, ("epoch time (s), slowest node", "bytes sent per node per epoch (MB, wire)")):
        labels = list(next(iter(plot.values())))
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=25, ha="right")
        axis.set_title(f"{title}\n{args.nodes} nodes, {args.model}, tau={args.tau}, batch {args.batch_size}")
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--node", help=argparse.SUPPRESS)  # internal: run one node's worker with this JSON spec
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rates", default="20mbit,100mbit", help="link rates in tc syntax, e.g. 1gbit,100mbit,20mbit")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"any of {', '.join(CONFIGS)}")
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
    parser.add_argument("--target-rate", default="20mbit", help="the rate the issue's targets are judged at")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "netcluster")
    parser.add_argument("--work-dir", type=Path, default=None, help="workers' logs and files (default: <out>/work)")
    args = parser.parse_args(argv)
    args.work_dir = args.work_dir or args.out / "work"
    if args.node is not None:
        # The orchestrator starts workers with these signals held (see run_plan); they must reach the worker.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
        spec = json.loads(args.node)
        _exit_with_parent(spec["parent"])
        node_main(spec)
        return 0
    args.rates = [r.strip() for r in args.rates.split(",") if r.strip()]
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown or args.nodes < 2 or not re.fullmatch(r"\d{1,3}\.\d{1,3}\.\d{1,3}", args.subnet):
        parser.error(f"unknown configuration(s) {unknown}; --nodes >= 2; --subnet like 10.213.0")
    for rate in args.rates:
        try:
            _rate_bits(rate)
        except ValueError as err:
            parser.error(str(err))

    reason = missing_capability()
    if reason is not None:
        print(f"netcluster: skipped, nothing measured: {reason}.")
        return 0
    from _common import run_metadata

    meta = run_metadata([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    stale = remove_stale_namespaces()
    if stale:
        print(f"netcluster: removed namespaces left by killed earlier runs: {', '.join(stale)}")
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGTERM, signal.SIGHUP)}
    cluster = Cluster(args.nodes, args.subnet)
    pairs = [{"rate": rate, "config": config} for rate in args.rates for config in args.configs]
    plan = []
    for repeat in range(args.repeats):  # every (rate, configuration) once per repeat, in a rotated order
        shift = (repeat * 5) % len(pairs)
        plan += [{**pair, "repeat": repeat} for pair in pairs[shift:] + pairs[:shift]]
    spec = {
        "tau": args.tau,
        "model": args.model,
        "batch_size": args.batch_size,
        "samples": args.samples,
        "image_size": args.image_size,
        "nodes": args.nodes,
        "threads": args.threads,
        "timeout": args.timeout,
        "port": args.port,
    }
    start = time.perf_counter()
    try:
        cluster.up()
        results = run_plan(cluster, spec, plan, args.work_dir, args.deadline)
    finally:
        cluster.down()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    jobs = [Job(job["rate"], job["config"], job["repeat"], nodes) for job, nodes in zip(plan, results)]
    meta["wall_time"] = f"{time.perf_counter() - start:.0f} s"
    text = report(jobs, args, meta)
    (args.out / "netcluster.md").write_text(text)
    (args.out / "netcluster.json").write_text(json.dumps([j.__dict__ for j in jobs]))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
