"""An emulated cluster on one machine: one Linux network namespace per node, on a bridge, links limited by tbf.

The "switch" namespace holds a Linux bridge; each node is a namespace of its own with one veth pair to the bridge
and an address in a private /24 that exists only inside these namespaces: nothing is added to the machine's own
network namespace and no traffic can leave. Every link is rate-limited in both directions with ``tc``'s token
bucket filter; ``run_plan`` runs one worker per node and a plan of jobs on it. Used by ``benchmarks/netcluster.py``;
needs Linux, root and iproute2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NS_PREFIX = "lsgdnc"  # namespace names: lsgdnc<pid>s (switch), lsgdnc<pid>n<i> (node i)
RATE_RE = re.compile(r"^\d+(\.\d+)?(bit|kbit|mbit|gbit)$", re.IGNORECASE)


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

    def launch_prefix(self, i: int) -> list[str]:
        """The command prefix that runs a program inside node ``i``'s namespace."""
        return ["ip", "netns", "exec", self.node(i)]

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
        bits = rate_bits(rate)
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


@dataclass
class Loopback:
    """The same interface as :class:`Cluster` without namespaces: every node a plain process on 127.0.0.1 (``lo``),
    no rate limit. For machines without root, where only the pipeline (not the network) can be exercised."""

    nodes: int

    def iface(self, i: int) -> str:
        return "lo"

    def address(self, i: int) -> str:
        return "127.0.0.1"

    def launch_prefix(self, i: int) -> list[str]:
        return []

    def set_rate(self, rate: str) -> None:
        """No links to limit."""


def rate_bits(rate: str) -> float:
    match = RATE_RE.match(rate)
    if not match:
        raise ValueError(f"link rate {rate!r}: use tc syntax such as 20mbit, 100mbit, 1gbit")
    unit = match.group(2).lower()
    scale = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}[unit]
    return float(rate[: -len(unit)]) * scale


def ready_to_measure(
    script: str, parser: argparse.ArgumentParser, rates: Sequence[str], measuring: bool, hint: str = ""
) -> bool:
    """The checks a benchmark on the emulated cluster makes before it runs.

    Every link rate in ``rates`` must be in tc syntax (else ``parser.error``). When ``measuring`` (not only
    reporting): ``False`` after saying why this machine cannot make namespaces (``script: skipped, ...`` and
    ``hint``), else the namespaces left by killed earlier runs are removed (saying so) and the answer is ``True``.
    """
    for rate in rates:
        try:
            rate_bits(rate)
        except ValueError as err:
            parser.error(str(err))
    if not measuring:
        return True
    reason = missing_capability()
    if reason is not None:
        print(f"{script}: skipped, nothing measured: {reason}{hint}.")
        return False
    stale = remove_stale_namespaces()
    if stale:
        print(f"{script}: removed namespaces left by killed earlier runs: {', '.join(stale)}")
    return True


class Interrupted(Exception):
    """SIGTERM/SIGHUP turned into an exception, so that ``finally`` blocks clean up as on Ctrl-C."""


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(f"signal {signum}")


def run_plan(cluster: Cluster | Loopback, script: Path, spec: dict[str, Any], plan: list[dict[str, Any]],
             workdir: Path, deadline_s: float,
             progress: Callable[[int, dict[str, Any], list[dict[str, Any]]], str] | None = None,
             ) -> list[list[dict[str, Any]]]:  # fmt: skip
    """Start one worker per node namespace, once, and run the jobs of ``plan`` one after another.

    A worker is ``python script --node SPEC`` (``spec`` plus the plan, its interface, the work folder and this
    process's id) with a multi-node job's environment; it must unblock SIGINT, SIGTERM and SIGHUP first thing.

    The workers stay up for the whole plan (one start-up, one process group). Before job k the link rate is set
    here, then the file ``go-k`` releases the workers; each writes ``node<i>-<k>.json`` when its epoch is done.
    Every job has a deadline; a worker that fails or a job that runs past its deadline stops everything.
    ``progress(k, job, node_results)`` is the line printed after job k (default: the slowest node's ``epoch_s``).
    """
    from lsgd_lightning.local_job import clean_launch_env  # here: importing the package imports Lightning

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
            env = clean_launch_env()
            env.update(
                NODE_RANK=str(i),
                MASTER_ADDR=cluster.address(0),
                MASTER_PORT=str(spec["port"]),
                GLOO_SOCKET_IFNAME=cluster.iface(i),
                TP_SOCKET_IFNAME=cluster.iface(i),  # TensorPipe (the asynchronous strategies' weights) likewise
                OMP_NUM_THREADS=str(spec["threads"]),
                PYTHONUNBUFFERED="1",
            )
            log = open(workdir / f"node{i}.log", "wb")  # noqa: SIM115 (closed in finally)
            logs.append(log)
            cmd = [*cluster.launch_prefix(i), sys.executable, str(script), "--node", json.dumps(node_spec)]
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
            print((progress or _epoch_line)(k, job, results[-1]) + f" (job {k + 1}/{len(plan)})", flush=True)
        return results
    finally:
        _stop(procs)
        for log in logs:
            log.close()


def counters(iface: str) -> tuple[int, int]:
    """Bytes sent and received so far by interface ``iface`` (whole frames, as the kernel counts them)."""
    base = Path("/sys/class/net") / iface / "statistics"
    return int((base / "tx_bytes").read_text()), int((base / "rx_bytes").read_text())


def settled_counters(iface: str, quiet_s: float = 0.3, limit_s: float = 20.0) -> tuple[int, int]:
    """The interface counters once nothing has moved for ``quiet_s`` (data still queued in tbf or sockets)."""
    last, since, end = counters(iface), time.monotonic(), time.monotonic() + limit_s
    while time.monotonic() < end:
        time.sleep(0.05)
        now = counters(iface)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return last


def exit_with_parent(parent: int) -> None:
    """End this worker as soon as the orchestrator ``parent`` is gone (even after SIGKILL): never wait forever.

    ``ip netns exec`` replaces itself with this process, so its parent is the orchestrator; when that dies this
    process is re-parented and ``getppid`` changes.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _epoch_line(k: int, job: dict[str, Any], nodes: list[dict[str, Any]]) -> str:
    epoch = max(node["epoch_s"] for node in nodes)
    return f"netcluster: {job['rate']:>8} {job['config']:<13} epoch {epoch:6.1f} s"


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


@contextlib.contextmanager
def cluster_up(nodes: int, subnet: str) -> Iterator[Cluster]:
    """The cluster, deleted on leaving, also on Ctrl-C, SIGTERM or SIGHUP (turned into exceptions meanwhile)."""
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGTERM, signal.SIGHUP)}
    cluster = Cluster(nodes, subnet)
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve_node(node: str | None, node_main: Callable[[dict[str, Any]], None]) -> bool:
    """The worker side of a script run with ``--node SPEC``: run ``node_main(spec)`` and return ``True``; ``False``
    (nothing run) for the orchestrator, where ``node`` is ``None``."""
    if node is None:
        return False
    # The orchestrator starts workers with these signals held (see run_plan); they must reach the worker.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    spec = json.loads(node)
    exit_with_parent(spec["parent"])
    node_main(spec)
    return True
