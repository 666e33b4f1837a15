"""AD-PSGD's asynchronous schedule (the default), run inside each worker process of a 4-worker job (a ring:
actives 0 and 2, passives 1 and 3).

One worker is slowed down (a sleep after each of its steps) and, after its step 2, holds until the workers it must
not slow down have started their batch ``AHEAD + 1``: a strategy that made them wait for it (a global step, a
collective per step) could never let them get there, so the hold would run out after ``HOLD_S`` and the progress it
saw would show it. Every rank saves the averages it took part in (``ADPSGDStrategy.exchanges``), which is all the
replay in ``tests/decentralized_simulation.adpsgd_replay`` needs.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from lsgd_lightning import ADPSGDStrategy
from tests.async_scenarios import Straggler
from tests.decentralized_scenarios import ADPSGD_SEED, TIMEOUT, fit
from tests.scenarios import run_scenarios

STEPS = 18  # 3 epochs of 6 batches per worker
SLOW_S = 0.05
HOLD_AFTER, AHEAD = 2, 8  # the slow worker holds after its step 2 until the others started batch 9
HOLD_S = 60.0
VAL_EVERY = 4  # validation on the workers' average: a meeting point, where passives serve between their steps


class HoldUntilAhead(pl.Callback):
    """On rank ``rank``, after its step ``HOLD_AFTER``: wait (at most ``HOLD_S``) until every rank of ``others``
    has started its batch ``AHEAD + 1`` (the job's heartbeats), and record the batches they had started then."""

    def __init__(self, rank: int, others: list[int]) -> None:
        self.rank, self.others = rank, others
        self.seen: list[int] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_rank != self.rank or trainer.global_step != HOLD_AFTER or not self.others:
            return
        health = trainer.strategy._health
        deadline = time.monotonic() + HOLD_S
        while min(health.progress(self.others)) <= AHEAD and time.monotonic() < deadline:
            time.sleep(0.01)
        self.seen = health.progress(self.others)


def make(**overrides: Any) -> ADPSGDStrategy:
    return ADPSGDStrategy(**{"seed": ADPSGD_SEED, "final_sync": False, "timeout": TIMEOUT, **overrides})


def _run(rank: int, world_size: int, strategy: ADPSGDStrategy, slow: int, others: list[int], **kw: Any) -> dict:
    hold = HoldUntilAhead(slow, others)
    result = fit(rank, world_size, strategy, callbacks=[Straggler(slow, SLOW_S), hold, *kw.pop("callbacks", [])], **kw)
    exchanges = [dataclasses.astuple(e) for e in strategy.exchanges]
    return {**result, "exchanges": exchanges, "withdrawn": strategy.withdrawn, "ahead_seen": hold.seen}


def scenario(name: str, rank: int, world_size: int, out: Path) -> dict[str, Any]:
    if name == "slow_active":  # rank 2 is slow: nobody waits for it (passives serve it when they get to it)
        return _run(rank, world_size, make(), 2, [0, 1, 3], steps=STEPS)
    if name == "slow_passive":  # rank 3 is slow: only an active that drew it waits for it, rank 1 never does
        return _run(rank, world_size, make(), 3, [1], steps=STEPS)
    if name == "meetings":  # validation on the workers' average (meetings mid-epoch) and the final sync
        strategy = make(final_sync=True)
        result = _run(rank, world_size, strategy, 2, [], steps=STEPS, val=True, val_check_interval=VAL_EVERY)
        return {**result, "reference_after_fit": strategy.layout.named_tensors(strategy._reference_weights())}
    if name == "resume":  # 3 epochs with a checkpoint per epoch; then again from the epoch-0 checkpoint
        common: dict[str, Any] = {"steps": -1, "max_epochs": 3, "enable_checkpointing": True}
        first = _run(rank, world_size, make(), 2, [], callbacks=[_checkpointer(out / "a")], **common)
        again = _run(
            rank,
            world_size,
            make(),
            2,
            [],
            callbacks=[_checkpointer(out / "b")],
            ckpt_path=str(out / "a" / "epoch=0.ckpt"),
            **common,
        )
        return {"uninterrupted": first, "resumed": again}
    raise KeyError(name)


def run_adpsgd_scenarios(rank: int, world_size: int, out: str, names: list[str]) -> None:
    run_scenarios(rank, world_size, out, names, run=scenario)


def _checkpointer(directory: Path) -> ModelCheckpoint:
    return ModelCheckpoint(
        dirpath=directory, filename="{epoch}", save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True
    )
