"""Fault tests with real processes: a worker raises or is SIGKILLed mid-run.

Every job runs as a script in its own subprocess (the subprocess launcher re-runs the command line), with a
deadline; afterwards no process of the job may remain.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lsgd_lightning.local_job import LocalJobError, run_local_job
from tests.conftest import script_env
from tests.failing_job import TIMEOUT, externally_launched

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "failing_job.py"


def job_processes(marker: str) -> list[int]:
    """PIDs whose command line contains ``marker`` (this machine's /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def run_failing_job(strategy: str, mode: str, tmp_path: Path) -> tuple[int, str, float]:
    """Run the job; return its exit code, its output and the seconds from rank 1's failure to the job's end.

    Timed from the failure, not from the start: starting the processes takes seconds to minutes on a loaded
    machine and says nothing about how the failure is handled. The subprocess timeout only stops a hung job.
    """
    marker = str(tmp_path / f"{strategy}-{mode}")  # an argument no other process has
    result = subprocess.run(
        [sys.executable, str(SCRIPT), strategy, mode, marker],
        cwd=tmp_path,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    end = time.time()
    output = result.stdout + result.stderr
    failed_at = re.search(r"rank 1 fails at ([\d.]+)", output)
    assert failed_at, f"the job ended before rank 1's failure:\n{output[-4000:]}"
    elapsed = end - float(failed_at.group(1))
    deadline = time.monotonic() + 10
    while job_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert job_processes(marker) == [], "processes of the job were left behind"
    return result.returncode, output, elapsed


@pytest.mark.parametrize("strategy", ["lsgd", "lsgd_multi", "easgd", "dataparallel"])
def test_a_raising_worker_stops_the_job_and_is_named(strategy: str, tmp_path: Path) -> None:
    code, output, elapsed = run_failing_job(strategy, "raise", tmp_path)
    assert code != 0
    assert elapsed < TIMEOUT.total_seconds() / 2, "the job should stop well within the collective timeout"
    assert "injected failure in training_step" in output
    # the surviving rank's error says which rank failed and why (through the failure board), or Lightning's
    # child-process observer named it while ending the job
    assert re.search(r"rank 1 failed with RuntimeError: injected failure|\[rank: 1\] Child process", output), output[
        -4000:
    ]


def test_a_killed_worker_stops_the_job_and_is_named(tmp_path: Path) -> None:
    code, output, elapsed = run_failing_job("lsgd", "kill", tmp_path)
    assert code != 0
    assert elapsed < TIMEOUT.total_seconds() / 2
    assert re.search(r"rank\(s\) \[1\] did not answer|\[rank: 1\] Child process .* terminated with code -9", output), (
        output[-4000:]
    )


def test_failure_board_names_a_killed_rank_under_an_external_launcher(tmp_path: Path) -> None:
    """Without Lightning's observer (torchrun, SLURM), the survivor's error itself names the silent rank."""
    # not a LocalJobTimeout: rank 0 ends by itself after its peer died (the deadline is a hang guard: start-up alone
    # took over 20 s under load)
    with pytest.raises(LocalJobError) as caught:
        run_local_job(externally_launched, 2, (str(tmp_path),), deadline_s=300, grace_s=60)
    assert caught.value.exit_codes == [0, -9], str(caught.value)
    message = (tmp_path / "rank0.txt").read_text()
    assert "rank(s) [1] did not answer" in message, message
