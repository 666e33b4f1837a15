"""The two ways Lightning starts the workers: the spawn launcher in-process and the subprocess (popen) launcher.

The popen launcher re-runs the command line in each child, so it runs as a script in its own subprocess with a
deadline, never inside the pytest process.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch

from lsgd_lightning import LSGDStrategy
from tests import models
from tests.conftest import clean_launch_env

ROOT = Path(__file__).resolve().parents[1]


def test_spawn_launcher_returns_the_leader_to_the_parent() -> None:
    pl.seed_everything(0, verbose=False)
    strategy = LSGDStrategy(tau=2, start_method="spawn", timeout=timedelta(seconds=60))
    trainer = pl.Trainer(**models.trainer_options(2, strategy, max_steps=6))
    model = models.Regressor()
    before = model.net.body[0].weight.detach().clone()
    trainer.fit(model, models.train_loader(2))
    # the parent gets rank 0's weights back; with final_sync those are the leader's
    assert not torch.equal(before, model.net.body[0].weight)
    assert float(trainer.callback_metrics["comm/rounds"]) == 3
    assert float(trainer.callback_metrics["lsgd/leader"]) in (0.0, 1.0)


def test_subprocess_launcher_runs_the_minimal_example() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "minimal.py"), "--devices", "2", "--max-epochs", "1"],
        cwd=ROOT,
        env=clean_launch_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = [line for line in result.stdout.splitlines() if line.startswith("strategy=lsgd")]
    assert len(summary) == 1, result.stdout[-2000:]  # printed by rank 0 only
    fields = dict(item.split("=") for item in summary[0].split())
    assert fields["workers"] == "2" and int(fields["rounds"]) == 64 // 2 // 16  # 2048/32/2 steps, tau=16
    assert float(fields["val_acc"]) > 0.8
