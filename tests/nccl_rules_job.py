"""Workers for ``tests/test_nccl_rules.py`` (module level, so that spawned processes can import them)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


def tags_are_ignored(rank: int, world_size: int, out: str) -> None:
    """Rank 0 sends A (tag 1) then B (tag 2); rank 1 receives tag 2 first. Matched by order (NCCL), the first
    receive gets A; matched by tag (gloo), it would get B."""
    # the launcher sets MASTER_ADDR/MASTER_PORT (and LOCAL_RANK, as torchrun does)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    if rank == 0:
        works = [dist.isend(torch.full((2,), 1.0), 1, tag=1), dist.isend(torch.full((2,), 2.0), 1, tag=2)]
        for work in works:
            work.wait()
        first = second = torch.zeros(2)
    else:
        first, second = torch.zeros(2), torch.zeros(2)
        works = [dist.irecv(first, 0, tag=2), dist.irecv(second, 0, tag=1)]
        for work in works:
            work.wait()
    torch.save(
        {"first": first, "second": second, "wrapped": bool(getattr(dist.all_reduce, "__nccl_rules__", False))},
        Path(out) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()
