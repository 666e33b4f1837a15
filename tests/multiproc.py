"""The tests' name for the package's local launcher, :func:`lsgd_lightning.local_job.run_local_job`.

Each worker looks to Lightning like one rank of a ``torchrun`` launch, so a process can run several Trainers one
after another on the same process group (one interpreter start-up per worker); a hang kills every worker and fails
the test instead of the suite; a failure raises with each failing rank's traceback (also kept in ``errdir``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lsgd_lightning.local_job import free_port, run_local_job

__all__ = ["free_port", "rank_results", "run_workers", "scenario_job"]


def run_workers(
    fn: Callable[..., None], world_size: int, args: tuple[Any, ...], errdir: Path, timeout_s: float
) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes, one torch thread each."""
    run_local_job(fn, world_size, args, deadline_s=timeout_s, workdir=errdir)


def scenario_job(prefix: str, fn: Callable[..., None], world_size: int, scenarios: list[str], timeout_s: float) -> Any:
    """A module-scoped ``job`` fixture: one local job runs ``fn(rank, world_size, out, scenarios)`` for the whole
    module and the tests read what each rank saved under ``out/<scenario>/rank<r>.pt`` (see :func:`rank_results`)."""

    @pytest.fixture(scope="module", name="job")
    def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
        out = tmp_path_factory.mktemp(prefix)
        run_workers(fn, world_size, (str(out), scenarios), errdir=out / "errors", timeout_s=timeout_s)
        return out

    return job


def rank_results(job: Path, name: str, world_size: int, weights_only: bool = True) -> list[dict[str, Any]]:
    """What every rank of scenario ``name`` saved."""
    return [torch.load(job / name / f"rank{r}.pt", weights_only=weights_only) for r in range(world_size)]


def assert_refused_before_the_first_step(results: list[dict[str, Any]], message: str) -> None:
    """Every rank's saved result (of an ``expect_error`` scenario) holds an error containing ``message`` and no step."""
    for rank, result in enumerate(results):
        assert result["error"] is not None and message in result["error"], (rank, result)
        assert result["steps"] == 0
