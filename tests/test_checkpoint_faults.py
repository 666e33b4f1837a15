"""Checkpoints under faults, with real processes: a killed job resumes exactly; a crash mid-write leaves no
checkpoint that looks complete; a corrupt file is named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lsgd_lightning import LSGDStrategy
from lsgd_lightning.strategies.checkpoints import atomic_torch_save
from tests import models
from tests.conftest import script_env

ROOT = Path(__file__).resolve().parents[1]


def run_job(out: Path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tests" / "checkpoint_job.py"), str(out), mode],
        cwd=out,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=400,  # a hang guard (the rendezvous alone may take checkpoint_job.TIMEOUT)
        start_new_session=True,  # its own process group, which the crash mode kills whole
    )


def test_a_job_killed_right_after_a_checkpoint_resumes_to_the_same_result(tmp_path: Path) -> None:
    full = run_job(tmp_path, "full")
    assert full.returncode == 0, full.stderr[-3000:]
    crash = run_job(tmp_path, "crash")
    assert crash.returncode == -9, crash.stderr[-3000:]
    assert not (tmp_path / "ckpt_crash" / "epoch=1.ckpt").exists()
    resume = run_job(tmp_path, "resume")
    assert resume.returncode == 0, resume.stderr[-3000:]
    for rank in range(2):
        a = torch.load(tmp_path / f"full_rank{rank}.pt", weights_only=True)
        b = torch.load(tmp_path / f"resume_rank{rank}.pt", weights_only=True)
        for key, value in a["weights"].items():
            assert torch.equal(value, b["weights"][key]), f"rank {rank}: {key}"
        for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
            assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"]), f"rank {rank}"


CRASH_MID_WRITE = """
import os, signal, sys, torch
from pathlib import Path
from lsgd_lightning.strategies.checkpoints import atomic_torch_save

def half_then_die(obj, path):
    with open(path, "wb") as handle:
        handle.write(b"PK" + bytes(1000))  # the start of a checkpoint, then the process dies
        handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)

atomic_torch_save({"weights": torch.ones(3)}, Path(sys.argv[1]), half_then_die)
"""


def test_a_crash_while_writing_never_leaves_a_checkpoint_that_looks_complete(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"weights": torch.zeros(3)}, target)  # the last complete checkpoint
    result = subprocess.run([sys.executable, "-c", CRASH_MID_WRITE, str(target)], env=script_env(), timeout=60)
    assert result.returncode == -9
    assert torch.equal(torch.load(target, weights_only=True)["weights"], torch.zeros(3))  # still the old one
    assert [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"] != []  # only a hidden .tmp remains


def test_a_write_that_raises_leaves_nothing_behind(tmp_path: Path) -> None:
    def broken(obj: object, path: Path) -> None:
        path.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"a": 1}, tmp_path / "x.ckpt", broken)
    assert list(tmp_path.iterdir()) == []


def test_a_corrupt_checkpoint_is_named_in_the_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.ckpt"
    path.write_bytes(b"this is not a checkpoint")
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, strategy=LSGDStrategy(), logger=False, max_steps=2, default_root_dir=tmp_path
    )
    with pytest.raises(RuntimeError, match=r"broken\.ckpt' could not be read"):
        trainer.fit(models.Regressor(), models.train_loader(1), ckpt_path=str(path))
