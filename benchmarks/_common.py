"""Helpers shared by the benchmark scripts: launching local worker jobs with a deadline, run metadata, tables.

Not a public API: the scripts in this folder import it as a sibling module (``python benchmarks/<script>.py`` puts
this folder first on ``sys.path``, and spawned workers inherit that path).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (for MASTER_PORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_external_launch_env(rank: int, world_size: int, port: int, threads: int = 1) -> None:
    """Make this process one rank of a local job, as ``torchrun`` would: Lightning then sees an external launch.

    ``OMP_NUM_THREADS`` is set too, so the strategies leave the thread count chosen here alone.
    """
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS=str(threads),
    )


def run_local_job(fn: Callable[..., None], nprocs: int, args: tuple[Any, ...], deadline_s: float) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes; kill them all if they are not done by the deadline.

    A failing rank raises here (``ProcessRaisedException``) and the others are terminated by torch. A job still
    running at the deadline (e.g. ranks waiting on each other) is terminated and reported as ``TimeoutError``.
    """
    context = mp.start_processes(fn, args, nprocs=nprocs, start_method="spawn", join=False)
    end = time.monotonic() + deadline_s
    while not context.join(timeout=1.0):
        if time.monotonic() > end:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            for process in context.processes:
                process.join(5)
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"the {nprocs}-process job did not finish within {deadline_s:.0f} s")


def quiet_warnings() -> None:
    """Hide warnings that every short benchmark run triggers and that say nothing about the measurement."""
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r".*it is recommended to use `Trainer\(devices=1, num_nodes=1\)`")
    warnings.filterwarnings("ignore", message=r".*runs with a single worker.*")
    warnings.filterwarnings("ignore", message=r".*The number of training batches.*")
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor` is deprecated.*")
    for name in ("lightning.pytorch", "lightning.fabric"):  # "GPU available: False", tips, ...
        logging.getLogger(name).setLevel(logging.WARNING)


def git_commit() -> str:
    """Short commit hash of the checkout, with ``+dirty`` when tracked files under ``benchmarks/``/``src/`` differ."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def gpu_description() -> str:
    import torch

    if torch.cuda.is_available():
        return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return "none"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def run_metadata(argv: Sequence[str] | None = None) -> dict[str, str]:
    """What RESULTS.md records with every table: command, date, commit, machine and the load when it started."""
    import lightning
    import torch

    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(REPO)
    return {
        "command": shlex.join(["python", str(script), *argv[1:]]),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "machine": f"{cpu_count()} CPU cores ({cpu_model()}), GPU: {gpu_description()}",
        "software": f"torch {torch.__version__}, lightning {lightning.__version__}, python {platform.python_version()}",
        "load_start": load_average(),
    }


def metadata_markdown(meta: dict[str, str]) -> str:
    """The metadata as a markdown bullet list (load average at the start and, if recorded, at the end)."""
    lines = [
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}, commit `{meta['commit']}`",
        f"- machine: {meta['machine']}; {meta['software']}",
        f"- load average (1, 5, 15 min) at start: {meta['load_start']}"
        + (f"; at end: {meta['load_end']}" if "load_end" in meta else ""),
    ]
    if "wall_time" in meta:
        lines.append(f"- wall time of the whole benchmark: {meta['wall_time']}")
    return "\n".join(lines) + "\n"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def pyplot() -> Any:
    """matplotlib's pyplot with the file-only Agg backend, or ``None`` (with a message) if it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'lsgd-lightning[app]').")
        return None
    return plt


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]
