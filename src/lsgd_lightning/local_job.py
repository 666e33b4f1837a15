"""Run a function in P local processes that look to Lightning like one ``torchrun`` launch, with a deadline.

Each process gets ``MASTER_ADDR``/``MASTER_PORT``, ``LOCAL_RANK``, ``NODE_RANK=0``, ``WORLD_SIZE`` and
``OMP_NUM_THREADS``, so a ``Trainer`` in it detects an external launch and starts no processes itself; one process
can then run several Trainers one after another on the same process group, which pays the (slow) interpreter
start-up once per worker. Used by the test suite and the benchmarks. It imports neither torch nor Lightning: a
worker imports what its function needs, and no more (importing Lightning costs several CPU-seconds per process).

    from lsgd_lightning.local_job import run_local_job

    def worker(rank: int, world_size: int, out: str) -> float:  # module level: the spawn start method pickles it
        ...  # build a Trainer(devices=world_size, ...) and fit
        return loss

    losses = run_local_job(worker, 4, ("out",), deadline_s=600)  # [rank 0's loss, rank 1's, ...]
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import random
import runpy
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

# Variables by which Lightning (or torchrun, SLURM) decides that a process belongs to a job, and which one.
LAUNCH_ENV_VARS = (
    "LOCAL_RANK",
    "NODE_RANK",
    "GROUP_RANK",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "PL_GLOBAL_SEED",
    "PL_TRAINER_GPUS",
    "TORCHELASTIC_RUN_ID",
    "GLOO_SOCKET_IFNAME",
)


_CHILD = "__lsgd_local_job_worker__"  # the module name this file runs under in a worker


class LocalJobError(RuntimeError):
    """A worker of a local job failed. ``exit_codes[rank]``: its exit code (negative: killed by that signal; the
    ranks stopped after the failure show their stop signal); ``tracebacks[rank]``: the traceback of each rank that
    raised; ``pids[rank]``: its process id (every one of them has ended and been reaped)."""

    def __init__(
        self, message: str, exit_codes: list[int | None], tracebacks: dict[int, str], pids: list[int | None]
    ) -> None:
        super().__init__(message)
        self.exit_codes = exit_codes
        self.tracebacks = tracebacks
        self.pids = pids


class LocalJobTimeout(LocalJobError, TimeoutError):
    """The job was still running at its deadline (ranks waiting on each other, or one that never ends)."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now that no outgoing connection can take before the job binds it (``MASTER_PORT``).

    Nothing holds the port between this call and rank 0's TCPStore binding it (the workers' start-up: seconds, a
    minute on a loaded machine). A port from ``bind(0)`` lies in the kernel's ephemeral range, from which it also
    picks the local port of every outgoing connection (gloo's pairs, other jobs' store clients), and one taken in
    between makes the store fail with EADDRINUSE. Ports below that range are only taken by an explicit ``bind``, so
    one is drawn there at random (``bind(0)`` if none is free).
    """
    low, draw = _ephemeral_ports_start(), random.SystemRandom()
    for _ in range(64 if low > 11000 else 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", draw.randrange(10000, low)))
            except OSError:
                continue
            return sock.getsockname()[1]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ephemeral_ports_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def clean_launch_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``base`` (default: ``os.environ``) without the variables that would make Lightning join a job."""
    env = dict(os.environ if base is None else base)
    return {k: v for k, v in env.items() if k not in LAUNCH_ENV_VARS and not k.startswith("SLURM_")}


def run_local_job(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    deadline_s: float,
    threads: int = 1,
    grace_s: float = 2.0,
    workdir: Path | str | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` for rank 0..world_size-1 in spawned processes; return their results.

    Args:
        fn: a module-level function (the spawn start method pickles it by name, and ``args`` by value).
        world_size: P, the number of processes (ranks) on this machine, one node.
        deadline_s: seconds from the start after which every worker still running is killed.
        threads: torch threads per worker (``torch.set_num_threads`` and ``OMP_NUM_THREADS``).
        grace_s: after one worker fails, seconds the others get to end by themselves (e.g. to report the peer they
            lost) before they are killed.
        workdir: where each rank writes ``rank<r>.err`` (its traceback) and ``rank<r>.result``; kept for
            inspection. Default: a temporary folder, removed afterwards.

    Returns:
        ``fn``'s return values in rank order, pickled back through ``workdir``: plain data, or instances of classes
        the parent can import (not of classes defined in a script run as ``__main__``).

    Raises:
        LocalJobTimeout: (a ``TimeoutError``) the job ran past ``deadline_s``; every worker was killed.
        LocalJobError: (a ``RuntimeError``) a worker raised or died; the message holds every failing rank's exit
            code and traceback. No worker is left running when either is raised.
    """
    with _workdir(workdir) as folder:
        procs = _processes(fn, world_size, tuple(args), threads, folder)
        try:
            for proc in procs:
                proc.start()
            finished = _wait(procs, deadline_s, grace_s)
        finally:
            _stop(procs)
        _raise_on_failure(procs, folder, finished, deadline_s)
        return [_load_result(folder / f"rank{r}.result") for r in range(world_size)]


def _processes(fn: Callable[..., Any], world_size: int, args: tuple, threads: int, folder: Path) -> list[Any]:
    """One spawn process per rank. It runs this file by path rather than importing ``lsgd_lightning.local_job``:
    importing the package would import Lightning into every worker, needed or not. Not daemonic: a worker may
    start processes of its own (DataLoader workers); the caller stops them all."""
    context, port = multiprocessing.get_context("spawn"), free_port()
    return [
        context.Process(
            target=runpy.run_path,
            args=(__file__,),
            kwargs={
                "run_name": _CHILD,
                "init_globals": {"JOB": (fn, rank, world_size, port, threads, str(folder), args, sys.argv[0])},
            },
            name=f"local-job-rank{rank}",
        )
        for rank in range(world_size)
    ]


def _raise_on_failure(procs: list[Any], folder: Path, finished: bool, deadline_s: float) -> None:
    codes, pids = [proc.exitcode for proc in procs], [proc.pid for proc in procs]
    tracebacks = {r: p.read_text() for r in range(len(procs)) if (p := folder / f"rank{r}.err").exists()}
    if not finished:
        message = f"the {len(procs)}-process job did not finish within {deadline_s:.0f} s (a hang?); every worker "
        raise LocalJobTimeout(message + f"was killed{_describe(codes, tracebacks)}", codes, tracebacks, pids)
    if tracebacks or any(code != 0 for code in codes):
        message = f"the {len(procs)}-process job failed{_describe(codes, tracebacks)}"
        raise LocalJobError(message, codes, tracebacks, pids)


@contextlib.contextmanager
def _workdir(workdir: Path | str | None) -> Iterator[Path]:
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="local-job-") as tmp:
            yield Path(tmp)
        return
    folder = Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob("rank*.err"), *folder.glob("rank*.result")]:  # an earlier job's files would mislead
        stale.unlink()
    yield folder


def _worker_main(
    fn: Callable[..., Any], rank: int, world_size: int, port: int, threads: int, folder: str, args: tuple, argv0: str
) -> None:
    sys.argv[0] = argv0  # run_path set it to this file; the worker sees the parent's command line, as with spawn
    # Whatever launch the parent belongs to (torchrun, SLURM, a test), this process belongs to this job only.
    env = clean_launch_env()
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS=str(threads),  # the strategies leave a thread count chosen here alone
    )
    os.environ.clear()
    os.environ.update(env)
    # torch imported with fn's module read the parent's OMP_NUM_THREADS; a later import reads the one set above.
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    try:
        data = pickle.dumps(fn(rank, world_size, *args))
    except SystemExit as exit_:
        if exit_.code not in (None, 0):
            _write(Path(folder, f"rank{rank}.err"), traceback.format_exc())
        raise
    except BaseException:
        _write(Path(folder, f"rank{rank}.err"), traceback.format_exc())
        sys.exit(1)
    _write(Path(folder, f"rank{rank}.result"), data)


def _write(path: Path, data: str | bytes) -> None:
    """Write to a temporary name, then rename: the parent never reads half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    tmp.rename(path)


def _load_result(path: Path) -> Any:
    return pickle.loads(path.read_bytes()) if path.exists() else None


def _wait(procs: list[Any], deadline_s: float, grace_s: float) -> bool:
    """Wait until every worker has ended (True) or the deadline has passed (False); after a failure, wait no longer
    than ``grace_s`` for the others (True: the caller reports the failure)."""
    end = time.monotonic() + deadline_s
    while True:
        running = [p for p in procs if p.exitcode is None]
        if not running:
            return True
        if any(p.exitcode not in (None, 0) for p in procs):  # one died: the others would only wait for it
            end = min(end, time.monotonic() + grace_s)
            while running and time.monotonic() < end:
                wait([p.sentinel for p in running], timeout=end - time.monotonic())
                running = [p for p in running if p.exitcode is None]
            return True
        left = end - time.monotonic()
        if left <= 0:
            return False
        wait([p.sentinel for p in running], timeout=left)


def _stop(procs: list[Any]) -> None:
    """Terminate the workers still running, then kill those that ignore it; reap them all."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        if proc.pid is None:  # never started
            continue
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _describe(codes: list[int | None], tracebacks: dict[int, str]) -> str:
    """Each rank's exit, then the traceback of each rank that raised."""
    lines = [f"rank {rank}: {_exit(code)}" for rank, code in enumerate(codes)]
    lines += [f"--- rank {rank} traceback:\n{text.rstrip()}" for rank, text in sorted(tracebacks.items())]
    return ":\n" + "\n".join(lines)


def _exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


if __name__ == _CHILD:  # a worker: runpy.run_path passed the job in as a global
    _worker_main(*globals()["JOB"])
