"""Run a module-level function in P spawned processes that look to Lightning like a torchrun launch.

Each process gets ``LOCAL_RANK``/``NODE_RANK``/``MASTER_*`` so Lightning's environment detects an external launch
and never starts processes itself; a process can then run several Trainers one after another on the same process
group, which keeps the (slow) interpreter start-up to one per worker. The parent enforces a deadline: a hang
kills every worker and fails the test instead of the suite.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(fn: Callable[..., None], rank: int, world_size: int, port: int, errdir: str, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        fn(rank, world_size, *args)
    except BaseException:
        Path(errdir, f"rank{rank}.err").write_text(traceback.format_exc())
        sys.exit(1)


def run_workers(
    fn: Callable[..., None], world_size: int, args: tuple[Any, ...], errdir: Path, timeout_s: float
) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; on failure raise with their tracebacks."""
    errdir.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, rank, world_size, port, str(errdir), args), daemon=True)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.is_alive() for p in procs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers still running after {timeout_s:.0f} s (a hang?)")
            failed = [p for p in procs if p.exitcode not in (None, 0)]
            if failed:  # one worker died: the others would only wait for it
                time.sleep(2)
                break
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=10)
    errors = sorted(errdir.glob("rank*.err"))
    codes = [p.exitcode for p in procs]
    if errors or any(code != 0 for code in codes):
        text = "\n".join(f"--- {e.name}\n{e.read_text()}" for e in errors)
        raise RuntimeError(f"worker exit codes {codes}\n{text}")
