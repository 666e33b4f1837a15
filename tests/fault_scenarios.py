"""Faults that Lightning users reported against DDP, as scenarios run inside each worker of a 2-worker test job.

- ``ckpt_<strategy>``: fit with a best and a last (``save_last="link"``) checkpoint, then evaluate checkpoints every
  way a user can name them (``"best"``, ``"last"`` through its symbolic link, a relative path, a copied folder, in the
  same Trainer and a fresh one); the tests compare each result with the checkpoint's evaluated model.
- ``sigterm_<strategy>``: rank 1 alone receives SIGTERM; every rank must stop before its next batch (the synchronous
  strategies at a common batch) and ``OnExceptionCheckpoint`` must write a complete checkpoint.
- ``metric_<strategy>``: a torchmetrics metric logged per epoch while one worker is far slower than the collective
  timeout (the asynchronous strategies): the metric's sync at the end of the epoch must wait for the live worker.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

import lsgd_lightning
from tests import models
from tests.decentralized_scenarios import PlainSGDRegressor, SignumRegressor
from tests.scenarios import SEED, run_scenarios

TIMEOUT = timedelta(seconds=60)
SIGTERM_RANK, SIGTERM_STEP = 1, 4
STRATEGIES: dict[str, tuple[type, dict[str, Any], type]] = {
    "lsgd": (lsgd_lightning.LSGDStrategy, {"tau": 2}, models.Regressor),
    "lsgd_multi": (
        lsgd_lightning.MultiLeaderLSGDStrategy,
        {"group_size": 1, "tau": 2, "local_tau": 1},
        models.Regressor,
    ),
    "easgd": (lsgd_lightning.EASGDStrategy, {"tau": 2}, models.Regressor),
    "dataparallel": (lsgd_lightning.DataParallelStrategy, {}, models.Regressor),
    "dpsgd": (lsgd_lightning.DPSGDStrategy, {}, models.Regressor),
    "d2": (lsgd_lightning.D2Strategy, {}, PlainSGDRegressor),
    "adpsgd": (lsgd_lightning.ADPSGDStrategy, {}, models.Regressor),
    "signum": (lsgd_lightning.SignumStrategy, {}, SignumRegressor),
    "lsgd_async": (lsgd_lightning.AsyncLSGDStrategy, {"tau": 2}, models.Regressor),
    "easgd_async": (lsgd_lightning.AsyncEASGDStrategy, {"tau": 2}, models.Regressor),
    "downpour": (lsgd_lightning.DownpourStrategy, {"tau": 2}, models.Regressor),
    "diloco": (lsgd_lightning.DiLoCoStrategy, {"tau": 2}, models.Regressor),
    "streaming_diloco": (
        lsgd_lightning.StreamingDiLoCoStrategy,
        {"tau": 4, "fragments": 2, "overlap_steps": 1},  # a fragment in flight at every odd step
        models.Regressor,
    ),
}
CHECKPOINT_EVAL = ("lsgd", "lsgd_local", "easgd", "dpsgd", "adpsgd", "lsgd_async", "easgd_async", "downpour")
CHECKPOINT_EVAL += ("diloco", "streaming_diloco")


def make(name: str, **overrides: Any) -> tuple[pl.strategies.Strategy, type]:
    local = name.endswith("_local")
    cls, settings, model_class = STRATEGIES[name.removesuffix("_local")]
    extra = {"eval_on": "local"} if local else {}
    return cls(**{**settings, **extra, "timeout": TIMEOUT, **overrides}), model_class


def trainer(strategy: pl.strategies.Strategy, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 2,
        "strategy": strategy,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return pl.Trainer(**{**options, **kwargs})


# ------------------------------------------------------------------------------------------------ checkpoints
def checkpoint_evaluations(name: str, rank: int, out: Path) -> dict[str, Any]:
    """Every way to name a checkpoint for evaluation, in the Trainer that wrote it and in fresh ones."""
    pl.seed_everything(SEED, verbose=False)
    strategy, model_class = make(name)
    model = model_class()
    checkpoints = ModelCheckpoint(dirpath=out / "ckpts", monitor="val_loss", save_top_k=1, save_last="link")
    fit = trainer(strategy, max_epochs=3, callbacks=[checkpoints])
    fit.fit(model, models.train_loader(2), models.val_loader(2))
    best, last = checkpoints.best_model_path, checkpoints.last_model_path
    results = {
        "best_path": best,
        "last_path": last,
        "same_best": fit.test(model, models.val_loader(2), ckpt_path="best", verbose=False)[0]["test_loss"],
        "same_last": fit.test(model, models.val_loader(2), ckpt_path="last", verbose=False)[0]["test_loss"],
        "same_relative": fit.validate(model, models.val_loader(2), ckpt_path=os.path.relpath(best), verbose=False)[0][
            "val_loss"
        ],
    }
    if rank == 0:
        shutil.copytree(out / "ckpts", out / "copied")
    torch.distributed.barrier()
    copied = str(out / "copied" / Path(best).name)
    fresh_strategy, _ = make(name)
    results["fresh_copied"] = trainer(fresh_strategy).test(
        model_class(), models.val_loader(2), ckpt_path=copied, verbose=False
    )[0]["test_loss"]
    fresh_strategy, _ = make(name)
    results["fresh_last"] = trainer(fresh_strategy).test(
        model_class(), models.val_loader(2), ckpt_path=last, verbose=False
    )[0]["test_loss"]
    return results


# ------------------------------------------------------------------------------------------------ SIGTERM
class SigtermAt(pl.Callback):
    """Rank ``rank`` sends itself SIGTERM after optimizer step ``step`` (one rank only, as a scheduler might)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step
        self.sent_at: float | None = None
        self.furthest: int | None = None  # the most batches any worker had started when the signal was sent

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step and self.sent_at is None:
            self.sent_at = time.monotonic()
            job = trainer.strategy._job
            self.furthest = max(job.health.progress(range(trainer.world_size)))
            os.kill(os.getpid(), signal.SIGTERM)


def sigterm_stop(name: str, rank: int, out: Path) -> dict[str, Any]:
    pl.seed_everything(SEED, verbose=False)
    strategy, model_class = make(name, **({} if name == "dataparallel" else {"final_sync": False}))
    sender = SigtermAt(SIGTERM_RANK, SIGTERM_STEP)
    # max_steps far beyond SIGTERM_STEP: an asynchronous worker may run ahead of the signalled one by any number
    job = trainer(strategy, max_steps=200, callbacks=[sender, OnExceptionCheckpoint(out, filename="sigterm")])
    started = time.monotonic()
    stopped_by = None
    try:
        job.fit(model_class(), models.train_loader(2))
    except SIGTERMException as exception:
        stopped_by = type(exception).__name__
    torch.distributed.barrier()  # every rank has finished writing before anyone looks
    shards = sorted(p.name for p in (out / "sigterm.ckpt.shards").glob("*.pt"))
    return {
        "stopped_by": stopped_by,
        "global_step": job.global_step,
        "furthest_at_signal": sender.furthest,
        "seconds": time.monotonic() - started,
        "checkpoint": (out / "sigterm.ckpt").is_file(),
        "shards": shards,
    }


# ------------------------------------------------------------------------------------------------ metrics
class MeanLossMetric(models.Regressor):
    """Logs a torchmetrics metric per epoch (synced by torchmetrics itself at the end of the epoch)."""

    def __init__(self) -> None:
        super().__init__()
        self.mean_loss = torchmetrics.MeanMetric()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.mean_loss.update(torch.full((1,), float(self.global_rank)))
        self.log("rank_mean", self.mean_loss, on_step=False, on_epoch=True)
        return loss


class SlowRank(pl.Callback):
    def __init__(self, rank: int, seconds: float) -> None:
        self.rank, self.seconds = rank, seconds

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_rank == self.rank:
            time.sleep(self.seconds)


def metric_with_straggler(name: str, rank: int, out: Path) -> dict[str, Any]:
    """6 batches per epoch, rank 1 sleeps 1 s after each: at the epoch's end it is ~6 s behind, the timeout is 4 s."""
    pl.seed_everything(SEED, verbose=False)
    strategy, _ = make(name, timeout=timedelta(seconds=4))
    # the epoch-end checkpoint (Lightning's default) goes into the job's folder, not the working directory
    job = trainer(strategy, max_epochs=1, limit_train_batches=6, callbacks=[SlowRank(1, 1.0)], default_root_dir=out)
    error = None
    try:
        job.fit(MeanLossMetric(), models.train_loader(2))
    except RuntimeError as exception:
        error = str(exception)
    return {"error": error, "rank_mean": float(job.callback_metrics.get("rank_mean", torch.tensor(-1.0)))}


def scenario(name: str, rank: int, world_size: int, out: Path) -> dict[str, Any]:
    kind, _, strategy = name.partition("_")
    if kind == "ckpt":
        return checkpoint_evaluations(strategy, rank, out)
    if kind == "sigterm":
        return sigterm_stop(strategy, rank, out)
    if kind == "metric":
        return metric_with_straggler(strategy, rank, out / f"metric_{strategy}")
    raise KeyError(name)


def run_fault_scenarios(rank: int, world_size: int, out: str, names: list[str]) -> None:
    run_scenarios(rank, world_size, out, names, run=scenario)
