"""A worker that trains with the package's strategies and leaves while gloo still runs its last collective.

Run by ``tests/test_exit.py`` in spawned processes. Workers died with SIGABRT after all their work on a loaded
machine when a gloo thread freed a collective's tensors during interpreter shutdown (see
``src/lsgd_lightning/strategies/shutdown.py``). That needs an unlucky schedule, but its precondition does not: a gloo
thread still alive when the interpreter finalizes. Each rank records the threads left once the package's exit
handler has run (an ``atexit`` function registered before any strategy's runs after theirs), with every kind of
strategy that creates or holds process groups and a last collective still in flight at exit.
"""

from __future__ import annotations

import atexit
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from lsgd_lightning import AsyncLSGDStrategy, DataParallelStrategy, LSGDStrategy, MultiLeaderLSGDStrategy
from tests.scenarios import _fit

TIMEOUT = timedelta(seconds=60)
GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")


def thread_names() -> list[str]:
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:
            continue
    return sorted(names)


def _record_threads(path: Path) -> None:
    path.write_text("\n".join(thread_names()))


def train_then_leave(rank: int, world_size: int, out: str) -> None:
    atexit.register(_record_threads, Path(out) / f"threads{rank}.txt")  # runs after the package's handler
    strategies = [
        LSGDStrategy(tau=2, overlap_steps=1, timeout=TIMEOUT),  # a process group for the overlapped transfers
        MultiLeaderLSGDStrategy(tau=2, group_size=1, local_tau=1, timeout=TIMEOUT),  # a group per row and column
        DataParallelStrategy(timeout=TIMEOUT),  # DDP's reducer holds the process group
        AsyncLSGDStrategy(tau=2, timeout=TIMEOUT),  # the store's board
    ]
    for strategy in strategies:
        _fit(rank, world_size, strategy, max_steps=4)
    late = torch.ones(1000)
    if rank == world_size - 1:
        time.sleep(1.0)  # the others are leaving by now
    dist.all_reduce(late, async_op=True)
    del late  # gloo's thread holds the only reference from here on
