"""Helpers for the app tests: running ``lsgd-train`` in a clean subprocess and reading W&B's offline run files."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.conftest import clean_launch_env

#: The app as a module; the console script is exercised by the non-editable install test.
APP = [sys.executable, "-m", "lsgd_lightning.train"]
#: A tiny multi-worker run (2 worker processes, 20 batches: one LSGD/EASGD round) with a short collective timeout.
SMOKE = ["experiment=smoke", "strategy.timeout_s=60"]


def app_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for an app subprocess: no launcher variables (a leaked LOCAL_RANK would make the run wait for
    peers), no W&B credentials or settings from the caller, and a test-owned cache directory."""
    env = clean_launch_env()
    for name in [name for name in env if name.startswith("WANDB_")]:
        del env[name]
    env.update(XDG_CACHE_HOME=str(cache_dir), WANDB_SILENT="true", **extra)
    return env


def run_app(
    args: Sequence[str],
    *,
    cwd: Path,
    cache_dir: Path,
    timeout: float,
    command: Sequence[str] = APP,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the app and capture its output (callers attach :func:`describe` to their assertions)."""
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        env=env or app_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def describe(result: subprocess.CompletedProcess[str]) -> str:
    """Exit code and the tails of both streams, for assertion messages."""
    return (
        f"exit code {result.returncode}\n--- stdout ---\n{result.stdout[-6000:]}\n"
        f"--- stderr ---\n{result.stderr[-6000:]}"
    )


def summary_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("lsgd-train summary:")]


def read_results(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "results.json").read_text())


def read_wandb_run(path: Path) -> dict[str, set[str]]:
    """Keys of the history, config and summary records of an offline ``run-*.wandb`` file.

    The file is W&B's record log: a 7-byte header (``:W&B``, magic, version) and then LevelDB-style 32 KiB blocks of
    records (crc32 4 bytes, length 2 bytes little-endian, type 1 byte: full/first/middle/last), each record a
    ``wandb_internal_pb2.Record`` protobuf. wandb >= 0.20 ships no Python reader, so this small one stands in.
    """
    from wandb.proto import wandb_internal_pb2 as pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    block, header = 32768, 7
    pos, pending, payloads = header, b"", []
    while pos + header <= len(data):
        room = block - pos % block
        if room < header:  # block trailer padding
            pos += room
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        body = data[pos + header : pos + header + length]
        pos += header + length
        if kind == 1:
            payloads.append(body)
        elif kind == 2:
            pending = body
        elif kind == 3:
            pending += body
        elif kind == 4:
            payloads.append(pending + body)
    keys: dict[str, set[str]] = {"history": set(), "config": set(), "summary": set()}
    for payload in payloads:
        record = pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        items = {
            "history": lambda r: r.history.item,
            "config": lambda r: r.config.update,
            "summary": lambda r: r.summary.update,
        }.get(kind)
        if items is not None:
            keys[kind] |= {item.key or "/".join(item.nested_key) for item in items(record)}
    return keys
