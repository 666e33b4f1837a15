"""The measuring side shared by the benchmark scripts: arguments, run metadata, result files, the run itself.

A benchmark run measures into its ``--out`` folder (CSV files and ``meta.json``: command, date, commit, machine,
load before and after, the resolved arguments), then writes its markdown report and plots from those files only,
the same way ``python benchmarks/report.py FOLDER`` regenerates them later without training.

Not a public API: the scripts in this folder import it as a sibling module (``python benchmarks/<script>.py`` puts
this folder first on ``sys.path``, and spawned workers inherit that path).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime as _dt
import importlib
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
import typing
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
META = "meta.json"
T = TypeVar("T")
Measure = Callable[[argparse.Namespace, dict[str, Any]], None]  # writes data files into args.out, facts into meta
Report = Callable[[Path, dict[str, Any]], str]  # reads a results folder: writes its plots, returns its markdown
# The app's overrides for CIFAR-10's per-channel mean and std (the imagefolder config defaults to ImageNet's).
CIFAR_NORMALIZATION = ["data.mean=[0.4914,0.4822,0.4465]", "data.std=[0.2470,0.2435,0.2616]"]
# The Trainer settings of every measured fit: no logger, checkpoints, progress bar or model summary (they would cost
# time and write files that say nothing about the measurement).
QUIET_TRAINER: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parser_for(doc: str | None) -> argparse.ArgumentParser:
    """A parser that shows the script's docstring, with ``--report-only``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report-only", type=Path, metavar="DIR", help="rewrite DIR's report from its stored files")
    return parser


def add_job_arguments(
    parser: argparse.ArgumentParser, timeout: float, deadline: float, out: str, timeout_help: str = "collective"
) -> None:
    """``--threads``, ``--timeout``, ``--deadline`` and ``--out``, as the local-job benchmarks take them."""
    parser.add_argument("--threads", type=int, default=cpu_count(), help="CPU threads shared by the workers")
    parser.add_argument("--timeout", type=float, default=timeout, help=f"{timeout_help} timeout (s)")
    parser.add_argument("--deadline", type=float, default=deadline, help="give up on a job after this many seconds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / out)


def check_known(parser: argparse.ArgumentParser, chosen: Sequence[str], known: Sequence[str], what: str) -> None:
    unknown = [name for name in chosen if name not in known]
    if unknown or not chosen:
        parser.error(f"unknown {what} {unknown}; choose from {', '.join(known)}")


def compose(overrides: list[str]) -> Any:
    """The ``lsgd-train`` app's configuration for ``overrides`` (Hydra's compose API on the packaged configs)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="lsgd_lightning.conf", version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


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


# ----------------------------------------------------------------------------------------------------------------
# Run metadata
# ----------------------------------------------------------------------------------------------------------------


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()


def git_commit() -> str:
    """Short commit hash of the checkout, with ``+dirty`` when tracked files under ``benchmarks/``/``src/`` differ."""
    try:
        commit = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
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


def run_metadata(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """What RESULTS.md records with every table: command, date, commit, machine and the load when it started."""
    import lightning
    import torch

    argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    script = Path(argv[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(REPO)
    return {
        "command": shlex.join(["python", str(script), *argv[1:]]),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "machine": f"{cpu_count()} CPU cores ({cpu_model()}), GPU: {gpu_description()}",
        "cores": cpu_count(),
        "software": f"torch {torch.__version__}, lightning {lightning.__version__}, python {platform.python_version()}",
        "load_start": load_average(),
    }


# ----------------------------------------------------------------------------------------------------------------
# Result files
# ----------------------------------------------------------------------------------------------------------------


def write_rows(path: Path, cls: type, rows: Sequence[Any]) -> None:
    """One CSV row per ``cls`` (dataclass) instance; floats keep every digit: a report from the file is the report."""
    names = [field.name for field in dataclasses.fields(cls)]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        writer.writerows(dataclasses.asdict(row) for row in rows)


def read_rows(path: Path, cls: type[T]) -> list[T]:
    """The rows of a CSV file as ``cls`` instances, each column converted to its field's type (int, float, bool)."""
    types = typing.get_type_hints(cls)

    def convert(name: str, text: str) -> Any:
        kind = types[name]
        if kind is bool:
            return text == "True"
        return kind(text) if kind in (int, float) else text

    with open(path, newline="") as handle:
        return [cls(**{k: convert(k, v) for k, v in row.items()}) for row in csv.DictReader(handle)]


def save_meta(folder: Path, meta: dict[str, Any]) -> None:
    (folder / META).write_text(json.dumps(meta, indent=1, default=str) + "\n")


def load_meta(folder: Path) -> dict[str, Any]:
    return json.loads((folder / META).read_text())


def stored_args(meta: dict[str, Any]) -> argparse.Namespace:
    """The arguments the run resolved (defaults included), as its script's code reads them."""
    return argparse.Namespace(**meta["args"])


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def run_jobs(worker: Callable[..., list[Any]], args: argparse.Namespace) -> list[Any]:
    """One local job per worker count P of ``args.workers``, running ``worker(rank, P, args)``; rank 0's results of
    all jobs, in order. Each worker gets ``args.threads // P`` threads (at least one); a job past ``args.deadline``
    seconds is killed (:func:`lsgd_lightning.local_job.run_local_job`)."""
    from lsgd_lightning.local_job import run_local_job  # here: importing the package imports Lightning

    results = []
    for world_size in args.workers:
        threads = max(1, args.threads // world_size)
        results += run_local_job(worker, world_size, (args,), deadline_s=args.deadline, threads=threads)[0]
    return results


def run(name: str, args: argparse.Namespace, argv: Sequence[str] | None, measure: Measure, report: Report) -> None:
    """Measure into ``args.out`` (the script's data files and meta.json), then write the report from those files.

    With ``--report-only DIR`` only the report is written, from DIR's files.
    """
    if args.report_only is not None:
        print(write_report(args.report_only, report))
        return
    meta = {"benchmark": name, **run_metadata(argv)}
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    measure(args, meta)
    meta["load_end"] = load_average()
    meta["wall_time"] = f"{time.perf_counter() - start:.0f} s"
    meta["args"] = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    save_meta(args.out, meta)
    print(write_report(args.out, report))


def write_report(folder: Path, report: Report | None = None) -> str:
    """Write ``<benchmark>.md`` (and the plots) of a results folder from its stored files; return the markdown.

    Without ``report``, that of ``<benchmark>_report.py`` for the benchmark named in the folder's meta.json (the
    report modules import neither torch nor Lightning).
    """
    folder = Path(folder)
    meta = load_meta(folder)
    report = report or importlib.import_module(f"{meta['benchmark']}_report").report
    text = report(folder, meta)
    (folder / f"{meta['benchmark']}.md").write_text(text)
    return text
