"""Training runs of the decentralized and sign-vote strategies, executed inside each worker of a multi-process job.

``run_decentralized_scenarios`` runs the named scenarios one after another on one process group and saves, per
scenario and rank, what ``tests/test_decentralized.py`` compares with ``tests/decentralized_simulation.py``: final
weights, optimizer state, every round's logged metrics, validation losses, communication counters, errors.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lsgd_lightning import ADPSGDStrategy, D2Strategy, DPSGDStrategy, SignumStrategy
from tests import models
from tests.scenarios import rank_offset_model, run_scenarios

SEED = 1234
TIMEOUT = timedelta(seconds=60)
STEPS = 14  # 6 batches per epoch with 4 workers: crosses epoch boundaries and ends mid-epoch
VAL_EVERY = 4
ADPSGD_STEPS = 36  # long enough for several passives serving two actives in one step
ADPSGD_SEED = 3
SIGNUM_LR = 0.01


class PlainSGDRegressor(models.Regressor):
    """SGD without momentum (what D² supports), with weight decay."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=models.LR, weight_decay=models.WEIGHT_DECAY)


class SignumRegressor(models.Regressor):
    """SGD as Signum's hyperparameters: lr, momentum (beta), weight decay."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            self.parameters(), lr=SIGNUM_LR, momentum=models.MOMENTUM, weight_decay=models.WEIGHT_DECAY
        )


class AdamRegressor(models.Regressor):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class RoundLog(pl.Callback):
    """This rank's round metrics (whenever a round happened) and validation losses."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, float]] = []
        self.val: list[float] = []
        self.val_steps: list[int] = []
        self._rounds_seen = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rounds_seen = trainer.strategy.comm.rounds  # not 0 after a resume

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        strategy = trainer.strategy
        if strategy.comm.rounds != self._rounds_seen:
            self._rounds_seen = strategy.comm.rounds
            self.rounds.append({"step": float(strategy.steps), **strategy.round_metrics})

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.val.append(float(trainer.callback_metrics["val_loss"]))
            self.val_steps.append(trainer.strategy.steps)


def fit(
    rank: int,
    world_size: int,
    strategy: pl.strategies.Strategy,
    model_class: type[models.Regressor] = models.Regressor,
    steps: int = STEPS,
    val: bool = False,
    **trainer_kwargs: Any,
) -> dict[str, Any]:
    """Train from rank-dependent initial weights (the strategy must start everyone from rank 0's)."""
    model = rank_offset_model(model_class, rank)
    log = RoundLog()
    ckpt_path = trainer_kwargs.pop("ckpt_path", None)
    callbacks = [log, *trainer_kwargs.pop("callbacks", [])]
    options = models.trainer_options(world_size, strategy, max_steps=steps, callbacks=callbacks, **trainer_kwargs)
    trainer = pl.Trainer(**options)
    trainer.fit(
        model,
        models.train_loader(world_size),
        models.val_loader(world_size) if val else None,
        ckpt_path=ckpt_path,
    )
    return {
        "state": {k: v.detach().clone() for k, v in model.net.state_dict().items()},
        "optimizer": trainer.optimizers[0].state_dict(),
        "rounds": log.rounds,
        "val": log.val,
        "val_steps": log.val_steps,
        "comm": strategy.comm.state_dict(),
        "steps": strategy.steps,
        "global_step": trainer.global_step,
        "extra": strategy._extra_state_dict(),
    }


def resume_pair(rank: int, world_size: int, out: Path, make_strategy: Any, model_class: type) -> dict[str, Any]:
    """3 epochs with a checkpoint per epoch; then 3 epochs again, resumed from the epoch-0 checkpoint."""

    def checkpoints(name: str) -> ModelCheckpoint:
        return ModelCheckpoint(
            dirpath=out / name, filename="{epoch}", save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True
        )

    common = {"steps": -1, "max_epochs": 3, "enable_checkpointing": True, "model_class": model_class}
    uninterrupted = fit(rank, world_size, make_strategy(), callbacks=[checkpoints("a")], **common)
    resumed = fit(
        rank,
        world_size,
        make_strategy(),
        callbacks=[checkpoints("b")],
        ckpt_path=str(out / "a" / "epoch=0.ckpt"),
        **common,
    )
    return {"uninterrupted": uninterrupted, "resumed": resumed}


def expect_error(rank: int, world_size: int, strategy: Any, model_class: type) -> dict[str, Any]:
    """Training that must stop with a ValueError on every rank before its first optimizer step."""
    try:
        fit(rank, world_size, strategy, model_class=model_class)
    except ValueError as error:
        return {"error": str(error), "steps": strategy.steps}
    return {"error": None, "steps": strategy.steps}


def scenario(name: str, rank: int, world_size: int, out: Path) -> dict[str, Any]:
    quiet = {"final_sync": False, "timeout": TIMEOUT}
    if name == "dpsgd":
        return fit(rank, world_size, DPSGDStrategy(**quiet), val=True, val_check_interval=VAL_EVERY)
    if name == "dpsgd_manual":
        return fit(rank, world_size, DPSGDStrategy(**quiet), model_class=models.ManualRegressor)
    if name == "dpsgd_exponential":
        return fit(rank, world_size, DPSGDStrategy(topology="exponential", timeout=TIMEOUT))
    if name == "d2":
        return fit(rank, world_size, D2Strategy(**quiet), model_class=PlainSGDRegressor)
    if name == "d2_resume":
        return resume_pair(rank, world_size, out, lambda: D2Strategy(**quiet), PlainSGDRegressor)
    if name == "adpsgd":
        strategy = ADPSGDStrategy(seed=ADPSGD_SEED, schedule="lockstep", **quiet)  # the deterministic variant
        return fit(rank, world_size, strategy, steps=ADPSGD_STEPS)
    if name == "signum":
        return fit(rank, world_size, SignumStrategy(timeout=TIMEOUT), model_class=SignumRegressor)
    if name == "signum_resume":
        return resume_pair(rank, world_size, out, lambda: SignumStrategy(**quiet), SignumRegressor)
    if name == "refuse_adam":
        return expect_error(rank, world_size, DPSGDStrategy(**quiet), AdamRegressor)
    if name == "refuse_d2_momentum":
        return expect_error(rank, world_size, D2Strategy(**quiet), models.Regressor)
    raise KeyError(name)


def run_decentralized_scenarios(rank: int, world_size: int, out: str, names: list[str]) -> None:
    run_scenarios(rank, world_size, out, names, run=scenario, ignore=Warning)
