"""Shared fixtures: keep distributed state from leaking between tests.

A leaked ``LOCAL_RANK`` (or a live default process group) makes the next Trainer believe it was launched
externally and wait forever for peers, so every test starts and ends with a clean launch environment.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch.distributed as dist

LAUNCH_ENV_VARS = (
    "LOCAL_RANK",
    "NODE_RANK",
    "GROUP_RANK",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "PL_GLOBAL_SEED",
    "PL_TRAINER_GPUS",
    "TORCHELASTIC_RUN_ID",
)


def clean_launch_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``base`` (default: ``os.environ``) without the variables that would make Lightning join a job."""
    env = dict(os.environ if base is None else base)
    for name in LAUNCH_ENV_VARS:
        env.pop(name, None)
    for name in list(env):
        if name.startswith("SLURM_"):
            env.pop(name)
    return env


@pytest.fixture(autouse=True)
def _isolate_distributed_state() -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in LAUNCH_ENV_VARS}
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
