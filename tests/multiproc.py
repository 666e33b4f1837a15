"""The tests' name for the package's local launcher, :func:`lsgd_lightning.local_job.run_local_job`.

Each worker looks to Lightning like one rank of a ``torchrun`` launch, so a process can run several Trainers one
after another on the same process group (one interpreter start-up per worker); a hang kills every worker and fails
the test instead of the suite; a failure raises with each failing rank's traceback (also kept in ``errdir``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lsgd_lightning.local_job import free_port, run_local_job

__all__ = ["free_port", "run_workers"]


def run_workers(
    fn: Callable[..., None], world_size: int, args: tuple[Any, ...], errdir: Path, timeout_s: float
) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes, one torch thread each."""
    run_local_job(fn, world_size, args, deadline_s=timeout_s, workdir=errdir)
