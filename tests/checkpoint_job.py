"""A 2-worker LSGD job with a checkpoint per epoch, run through Lightning's subprocess launcher.

python tests/checkpoint_job.py OUT full      # 3 epochs; saves every rank's final state
python tests/checkpoint_job.py OUT crash     # SIGKILLs its whole process group right after the first checkpoint
python tests/checkpoint_job.py OUT resume    # resumes from that checkpoint to 3 epochs; saves final states
"""

from __future__ import annotations

import os
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lsgd_lightning import LSGDStrategy
from tests import models

# The collective timeout, which with the subprocess launcher is also how long rank 0 and the child that re-runs
# this script wait for each other to reach the rendezvous: the child's start-up took over 30 s under load.
TIMEOUT = timedelta(seconds=120)


class KillJobAfterFirstCheckpoint(pl.Callback):
    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.current_epoch == 1 and trainer.is_global_zero:
            os.killpg(os.getpgid(0), signal.SIGKILL)  # the whole job, as a node failure or `scancel` would


def main(out: Path, mode: str) -> None:
    pl.seed_everything(0, verbose=False)
    callbacks: list[pl.Callback] = [
        ModelCheckpoint(dirpath=out / f"ckpt_{mode}", filename="{epoch}", save_top_k=-1, save_on_train_epoch_end=True)
    ]
    if mode == "crash":
        callbacks.append(KillJobAfterFirstCheckpoint())
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=LSGDStrategy(tau=4, final_sync=False, timeout=TIMEOUT),
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    model = models.Regressor()
    ckpt = str(out / "ckpt_crash" / "epoch=0.ckpt") if mode == "resume" else None
    trainer.fit(model, models.train_loader(2), ckpt_path=ckpt)
    state = {"weights": model.state_dict(), "optimizer": trainer.optimizers[0].state_dict()}
    torch.save(state, out / f"{mode}_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
