"""A worker process that trained successfully exits with code 0, whatever gloo's threads are doing at that moment.

Regression test for workers that died with SIGABRT ("terminate called without an active exception") after all their
work on a loaded machine: see ``src/lsgd_lightning/strategies/shutdown.py`` for the cause, ``tests/exit_job.py`` for
what the job does and records.
"""

from __future__ import annotations

from pathlib import Path

from tests.exit_job import GLOO_THREADS, train_then_leave
from tests.multiproc import run_workers

WORLD = 2


def test_workers_exit_0_with_no_gloo_thread_left_at_interpreter_shutdown(tmp_path: Path) -> None:
    run_workers(train_then_leave, WORLD, (str(tmp_path),), errdir=tmp_path / "errors", timeout_s=300)
    for rank in range(WORLD):
        threads = (tmp_path / f"threads{rank}.txt").read_text().split()
        assert not [name for name in threads if name in GLOO_THREADS], f"rank {rank}: gloo threads left: {threads}"
