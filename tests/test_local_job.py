"""The local launcher (``lsgd_lightning.local_job``): results come back, failures name their rank, hangs end.

The workers (``tests/local_job_workers.py``) are tiny module-level functions, no Lightning, no collectives: each test
costs the spawn start-up of two interpreters, a few seconds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lsgd_lightning.local_job import LocalJobError, LocalJobTimeout, run_local_job
from tests.local_job_workers import hang, raise_on_rank_1, report_launch


def assert_gone(pids: list[int | None]) -> None:
    assert len(pids) == 2 and all(pids)
    for pid in pids:
        with pytest.raises(ProcessLookupError):  # killed and reaped, not a zombie
            os.kill(pid, 0)


def test_results_come_back_in_rank_order_from_a_torchrun_like_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "7")  # a launch the parent belongs to must not leak into the job
    results = run_local_job(report_launch, 2, ("w",), deadline_s=60, threads=1)
    assert [r["tag"] for r in results] == ["w0", "w1"]
    for rank, env in enumerate(results):
        assert env["LOCAL_RANK"] == str(rank) and env["NODE_RANK"] == "0" and env["WORLD_SIZE"] == "2"
        assert env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0
        assert env["OMP_NUM_THREADS"] == "1" and env["threads"] == 1 and env["RANK"] == ""
    assert results[0]["MASTER_PORT"] == results[1]["MASTER_PORT"]


def test_a_raising_worker_fails_the_job_fast_with_its_rank_and_traceback(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(LocalJobError) as caught:
        run_local_job(raise_on_rank_1, 2, deadline_s=120, workdir=tmp_path / "job")
    assert time.monotonic() - start < 60, "waited for the deadline instead of failing fast"
    error = caught.value
    assert not isinstance(error, TimeoutError)
    assert "rank 1: exit code 1" in str(error) and "rank 0: killed by SIGTERM" in str(error)
    assert "--- rank 1 traceback:" in str(error) and "ValueError: injected failure on rank 1" in str(error)
    assert list(error.tracebacks) == [1] and "Traceback (most recent call last)" in error.tracebacks[1]
    assert error.exit_codes == [-15, 1]
    assert (tmp_path / "job" / "rank1.err").exists()  # kept for inspection when a workdir is given
    assert_gone(error.pids)


def test_a_hanging_job_is_killed_at_its_deadline() -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError) as caught:  # LocalJobTimeout
        run_local_job(hang, 2, deadline_s=5)
    assert time.monotonic() - start < 5 + 15  # the deadline, then at most terminate + join
    assert isinstance(caught.value, LocalJobTimeout)
    assert "did not finish within 5 s" in str(caught.value)
    assert_gone(caught.value.pids)
