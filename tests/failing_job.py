"""A 2-worker job in which rank 1 fails at step 3; run through Lightning's subprocess launcher.

    python tests/failing_job.py STRATEGY MODE       # MODE: raise | kill

The test checks that every process exits non-zero soon after, that the error names rank 1, and that no process
of the job is left behind.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from datetime import timedelta

import lightning.pytorch as pl
import torch

from lsgd_lightning import DataParallelStrategy, EASGDStrategy, LSGDStrategy
from tests import models

FAIL_RANK, FAIL_STEP = 1, 3
# The collective timeout, which is also how long rank 0 waits for the other processes to start (rendezvous): the
# subprocess launcher's child re-runs this script, which took over 20 s on a loaded machine. The tests check that a
# failure stops the job well within it (it is seen, not waited out).
TIMEOUT = timedelta(seconds=120)


class FailingRegressor(models.Regressor):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.global_rank == FAIL_RANK and self.global_step == FAIL_STEP:
            print(f"rank {FAIL_RANK} fails at {time.time():.3f}", flush=True)  # when, for the tests
            if self.mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("injected failure in training_step")
        return super().training_step(batch, batch_idx)


def make_strategy(name: str) -> pl.strategies.Strategy:
    timeout = TIMEOUT
    if name == "lsgd":
        return LSGDStrategy(tau=1, timeout=timeout)
    if name == "lsgd_multi":
        return LSGDStrategy(tau=2, local_tau=1, group_size=1, timeout=timeout)
    if name == "easgd":
        return EASGDStrategy(tau=1, timeout=timeout)
    return DataParallelStrategy(timeout=timeout)


if __name__ == "__main__":
    strategy_name, mode = sys.argv[1], sys.argv[2]
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=make_strategy(strategy_name),
        max_steps=50,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(FailingRegressor(mode), models.train_loader(2))


def externally_launched(rank: int, world_size: int, out: str) -> None:
    """As under torchrun (no Lightning observer): rank 1 is killed; rank 0 saves the error it gets."""
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=make_strategy("lsgd"),
        max_steps=50,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    try:
        trainer.fit(FailingRegressor("kill"), models.train_loader(world_size))
    except RuntimeError as error:
        with open(os.path.join(out, f"rank{rank}.txt"), "w") as handle:
            handle.write(str(error))
