"""Workers for tests/test_local_job.py, in a module of their own that imports neither torch nor Lightning at import
time: a spawned worker imports it, and the launcher's tests should cost interpreter start-ups only."""

from __future__ import annotations

import os
import time


def report_launch(rank: int, world_size: int, tag: str) -> dict[str, str | int]:
    """This worker's launch environment and torch's thread count."""
    import torch

    names = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "OMP_NUM_THREADS", "RANK")
    return {"tag": f"{tag}{rank}", "threads": torch.get_num_threads(), **{n: os.environ.get(n, "") for n in names}}


def raise_on_rank_1(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("injected failure on rank 1")
    time.sleep(300)  # rank 0 would wait for its peer forever: the launcher must stop it


def hang(rank: int, world_size: int) -> None:
    time.sleep(300)
