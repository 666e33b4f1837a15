"""Shared fixtures: keep distributed state from leaking between tests.

A leaked ``LOCAL_RANK`` (or a live default process group) makes the next Trainer believe it was launched
externally and wait forever for peers, so every test starts and ends with a clean launch environment.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch.distributed as dist

from lsgd_lightning.local_job import LAUNCH_ENV_VARS, clean_launch_env

__all__ = ["clean_launch_env"]


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
