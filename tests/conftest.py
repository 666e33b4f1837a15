"""Shared fixtures: keep distributed state from leaking between tests.

A leaked ``LOCAL_RANK`` (or a live default process group) makes the next Trainer believe it was launched
externally and wait forever for peers, so every test starts and ends with a clean launch environment.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch.distributed as dist

from lsgd_lightning.local_job import LAUNCH_ENV_VARS, clean_launch_env
from tests import nccl_rules

ROOT = Path(__file__).resolve().parents[1]

# The suite runs every distributed scenario under NCCL's rules (tests/nccl_rules.py); LSGD_LIGHTNING_EMULATE_NCCL=0
# runs it on plain gloo. Set before anything imports `tests`, inherited by every worker and job script.
os.environ.setdefault(nccl_rules.ENV, "1")
nccl_rules.install_if_enabled()


def script_env(**extra: str) -> dict[str, str]:
    """``clean_launch_env()`` for one of the tests' job scripts run in a subprocess, plus ``extra``.

    ``PYTHONPATH`` starts with the repository root (the scripts import ``tests.*``) and the directory this process
    imported ``lsgd_lightning`` from, so the job runs the code under test even when another copy of the package is
    installed (an editable install of another checkout); what was on ``PYTHONPATH`` follows.
    """
    import lsgd_lightning

    env = clean_launch_env()
    package_parent = str(Path(lsgd_lightning.__file__).resolve().parents[1])
    paths = [str(ROOT), package_parent, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.update(extra)
    return env

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
