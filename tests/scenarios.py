"""Training scenarios run inside each worker process of a multi-process test job.

``run_scenarios`` runs the named scenarios one after another on one process group and saves, per scenario and rank,
what the tests compare against the reference simulation: final weights, optimizer state, every round's logged
metrics, validation losses, communication counters and warnings.
"""

from __future__ import annotations

import shutil
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lsgd_lightning import DataParallelStrategy, EASGDStrategy, LSGDStrategy
from tests import models

SEED = 1234
TIMEOUT = timedelta(seconds=60)

# The LSGD and EASGD settings the simulation replays (see tests/simulation.py).
LSGD = {"tau": 3, "pull_strength": 0.3, "leader_window": 2}
EASGD = {"tau": 3, "beta": 0.9}
MULTI = {
    "tau": 4,
    "pull_strength": 0.3,
    "leader_window": 2,
    "group_size": 2,
    "local_tau": 2,
    "local_pull_strength": 0.2,
    "pull_order": "simultaneous",  # what simulation.multi_leader_round replays (the default is "sequential")
}
MULTI_SEQUENTIAL = {k: v for k, v in MULTI.items() if k != "pull_order"}  # the default order: Algorithm 1's
BN_BATCHES = 2  # bn_recalibration_batches of the BatchNorm scenario
STEPS = 14  # crosses epoch boundaries (6 batches per epoch with 4 workers) and ends mid-epoch
VAL_EVERY = 3


class Recorder(pl.Callback):
    """Records each communication round's metrics and each validation loss on this rank."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, float]] = []
        self.val: list[float] = []
        self.initial: dict[str, torch.Tensor] = {}
        self._rounds_seen = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.initial = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        comm = getattr(trainer.strategy, "comm", None)  # Lightning's own DDP has no meter
        if comm is not None and comm.rounds != self._rounds_seen:
            self._rounds_seen = comm.rounds
            self.rounds.append({"step": float(trainer.global_step), **trainer.strategy.round_metrics})

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.val.append(float(trainer.callback_metrics["val_loss"]))


def rank_offset_model(make_model: Any, rank: int) -> Any:
    """A model from the one seed everywhere, then made to differ per rank (every parameter + 0.5·rank).

    One seed everywhere, as users must: Lightning seeds the (always shuffled) training DistributedSampler with it, and
    different seeds would give overlapping shards. The ranks' models are made to differ explicitly instead, so the
    identical start (rank 0's weights, which the strategy must hand everyone) is exercised.
    """
    pl.seed_everything(SEED, verbose=False)
    model = make_model()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.5 * rank)
    return model


def _trainer(world_size: int, strategy: pl.strategies.Strategy, recorder: Recorder, **kwargs: Any) -> pl.Trainer:
    options = models.trainer_options(world_size, strategy, callbacks=[recorder], **kwargs)
    if "extra_callbacks" in options:
        options["callbacks"] = [recorder, *options.pop("extra_callbacks")]
    return pl.Trainer(**options)


def _fit(
    rank: int,
    world_size: int,
    strategy: pl.strategies.Strategy,
    make_model: Any = models.Regressor,
    val: bool = False,
    ckpt_path: str | None = None,
    shuffle: bool = False,
    **trainer_kwargs: Any,
) -> dict[str, Any]:
    model = rank_offset_model(make_model, rank)
    recorder = Recorder()
    trainer_kwargs.setdefault("max_steps", STEPS)
    trainer = _trainer(world_size, strategy, recorder, **trainer_kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(
            model,
            models.train_loader(world_size, shuffle=shuffle),
            models.val_loader(world_size) if val else None,
            ckpt_path=ckpt_path,
        )
    return {
        "initial": recorder.initial,
        "state": {k: v.detach().clone() for k, v in model.net.state_dict().items()},
        "optimizer": trainer.optimizers[0].state_dict(),
        "rounds": recorder.rounds,
        "val": recorder.val,
        "comm": strategy.comm.state_dict() if hasattr(strategy, "comm") else {},
        "steps": getattr(strategy, "steps", trainer.global_step),
        "global_step": trainer.global_step,
        "warnings": [str(w.message) for w in caught],
    }


def _lsgd(**overrides: Any) -> LSGDStrategy:
    return LSGDStrategy(**{**LSGD, "final_sync": False, **overrides}, timeout=TIMEOUT)


def _easgd(**overrides: Any) -> EASGDStrategy:
    return EASGDStrategy(**{**EASGD, "final_sync": False, **overrides}, timeout=TIMEOUT)


def _resume_pair(
    rank: int, world_size: int, out: Path, make_strategy: Any, make_model: Any = models.Regressor
) -> dict[str, Any]:
    """Run 3 epochs with a checkpoint per epoch, then rerun from the epoch-0 checkpoint with a fresh model."""

    def checkpointer(name: str) -> ModelCheckpoint:
        return ModelCheckpoint(
            dirpath=out / name, filename="{epoch}", save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True
        )

    common = {"max_steps": -1, "max_epochs": 3, "enable_checkpointing": True, "shuffle": True, "make_model": make_model}
    uninterrupted = _fit(rank, world_size, make_strategy(), extra_callbacks=[checkpointer("ckpt_a")], **common)
    resumed = _fit(
        rank,
        world_size,
        make_strategy(),
        ckpt_path=str(out / "ckpt_a" / "epoch=0.ckpt"),
        extra_callbacks=[checkpointer("ckpt_b")],
        **common,
    )
    return {"uninterrupted": uninterrupted, "resumed": resumed}


def _expect_error(run: Any) -> dict[str, Any]:
    """Run a scenario that must fail alike on every rank; return the error message."""
    try:
        run()
    except (RuntimeError, ValueError) as error:
        return {"error": str(error)}
    return {"error": None}


def scenario(name: str, rank: int, world_size: int, out: Path) -> dict[str, Any]:
    """One named training run (the tests read the results by the same name)."""
    if name == "lsgd":
        csv = CSVLogger(out, name="csv", version=0)
        return _fit(rank, world_size, _lsgd(), logger=csv, log_every_n_steps=1)
    if name == "lsgd_eval_leader":
        return _fit(rank, world_size, _lsgd(), val=True, val_check_interval=VAL_EVERY)
    if name == "lsgd_eval_local":
        return _fit(rank, world_size, _lsgd(eval_on="local"), val=True, val_check_interval=VAL_EVERY)
    if name == "lsgd_final_sync":
        return _fit(rank, world_size, _lsgd(final_sync=True))
    if name == "lsgd_manual_nan_rank1":
        return _fit(rank, world_size, _lsgd(), make_model=lambda: models.ManualRegressor(report_nan_on=(1,)))
    if name == "lsgd_manual_all_nan":
        return _expect_error(
            lambda: _fit(rank, world_size, _lsgd(), make_model=lambda: models.ManualRegressor(tuple(range(world_size))))
        )
    if name == "lsgd_diverge":
        return _fit(rank, world_size, _lsgd(), make_model=lambda: models.DivergingRegressor(rank=1, step=4))
    if name == "lsgd_multi_diverge":
        strategy = LSGDStrategy(**MULTI, final_sync=False, timeout=TIMEOUT)
        return _fit(rank, world_size, strategy, make_model=lambda: models.DivergingRegressor(rank=2, step=4))
    if name == "easgd_diverge":
        return _fit(rank, world_size, _easgd(), make_model=lambda: models.DivergingRegressor(rank=1, step=4))
    if name == "dataparallel_diverge":
        strategy = DataParallelStrategy(timeout=TIMEOUT)
        return _expect_error(
            lambda: _fit(rank, world_size, strategy, make_model=lambda: models.DivergingRegressor(rank=1, step=4))
        )
    if name == "lsgd_fit_then_test":
        # trainer.test after fit (final_sync=False): the test sees the leader, and each rank keeps its own weights
        pl.seed_everything(SEED, verbose=False)
        model = models.Regressor()
        trainer = _trainer(world_size, _lsgd(), Recorder(), max_steps=STEPS)
        trainer.fit(model, models.train_loader(world_size))
        after_fit = {k: v.detach().clone() for k, v in model.net.state_dict().items()}
        metrics = trainer.test(model, models.val_loader(world_size), verbose=False)[0]
        after_test = {k: v.detach().clone() for k, v in model.net.state_dict().items()}
        return {"after_fit": after_fit, "after_test": after_test, "test_loss": float(metrics["test_loss"])}
    if name == "lsgd_eval_average":  # validation and the final sync on the workers' average
        return _fit(rank, world_size, _lsgd(eval_on="average", final_sync=True), val=True, val_check_interval=VAL_EVERY)
    if name == "lsgd_eval_average_bn":  # the same on a BatchNorm model, its statistics re-estimated
        strategy = _lsgd(eval_on="average", bn_recalibration_batches=BN_BATCHES, final_sync=True)
        return _fit(
            rank, world_size, strategy, make_model=models.BatchNormRegressor, val=True, val_check_interval=VAL_EVERY
        )
    if name == "lsgd_average_save_test":
        # final_sync=False: the checkpoint's main file and trainer.test hold the average, every rank keeps its own
        pl.seed_everything(SEED, verbose=False)
        model = models.Regressor()
        trainer = _trainer(world_size, _lsgd(eval_on="average"), Recorder(), max_steps=STEPS)
        trainer.fit(model, models.train_loader(world_size))
        after_fit = {k: v.detach().clone() for k, v in model.net.state_dict().items()}
        trainer.save_checkpoint(out / "average.ckpt")
        metrics = trainer.test(model, models.val_loader(world_size), verbose=False)[0]
        main = torch.load(out / "average.ckpt", weights_only=True) if rank == 0 else {"state_dict": {}}
        after_test = {k: v.detach().clone() for k, v in model.net.state_dict().items()}
        return {
            "after_fit": after_fit,
            "after_test": after_test,
            "test_loss": float(metrics["test_loss"]),
            "main": main["state_dict"],
            "main_holds": main.get("lsgd_lightning", {}).get("reference"),
        }
    if name == "lsgd_multi_sequential":  # Algorithm 1's order (the default), validating the workers' average
        strategy = LSGDStrategy(**MULTI_SEQUENTIAL, eval_on="average", final_sync=False, timeout=TIMEOUT)
        return _fit(rank, world_size, strategy, val=True, val_check_interval=VAL_EVERY)
    if name == "uneven_iterable":
        loader = DataLoader(models.UnevenIterable(), batch_size=models.BATCH)
        trainer = _trainer(world_size, _lsgd(), Recorder(), max_steps=20)
        return _expect_error(lambda: trainer.fit(models.Regressor(), loader))
    if name == "lsgd_repeat":  # determinism: the same seed and config as "lsgd"
        return _fit(rank, world_size, _lsgd())
    if name == "lsgd_resume_other_world":
        # rank 0 relabels a 4-worker checkpoint as written by 8 workers: everyone must start from its leader
        source, target = out.parent / "lsgd_resume" / "ckpt_a" / "epoch=0.ckpt", out / "relabelled.ckpt"
        if rank == 0:
            checkpoint = torch.load(source, weights_only=True)
            checkpoint["lsgd_lightning"]["world_size"] = 8
            torch.save(checkpoint, target)
        torch.distributed.barrier()
        return _fit(rank, world_size, _lsgd(tau=4), ckpt_path=str(target), max_steps=-1, max_epochs=2)
    if name == "lsgd_multi_resume":
        return _resume_pair(rank, world_size, out, lambda: LSGDStrategy(**MULTI, final_sync=False, timeout=TIMEOUT))
    if name == "dataparallel_resume":
        return _resume_pair(rank, world_size, out, lambda: DataParallelStrategy(timeout=TIMEOUT))
    if name == "lsgd_accumulate":
        return _fit(rank, world_size, _lsgd(tau=2), accumulate_grad_batches=2, max_steps=6)
    if name == "lsgd_resume":
        return _resume_pair(rank, world_size, out, lambda: _lsgd(tau=4))
    if name == "lsgd_missing_shard":
        # rank 0 copies an earlier checkpoint without rank 2's shard; every rank must fail with the same clear error
        source, target = out.parent / "lsgd_resume" / "ckpt_a" / "epoch=0.ckpt", out / "broken.ckpt"
        if rank == 0:
            shutil.copy(source, target)
            shutil.copytree(f"{source}.shards", f"{target}.shards")
            Path(f"{target}.shards", "rank_00002.pt").unlink()
            Path(f"{target}.shards", "rank_00001.pt").write_bytes(b"not a checkpoint")
        torch.distributed.barrier()
        try:
            _fit(rank, world_size, _lsgd(tau=4), ckpt_path=str(target), max_steps=-1, max_epochs=3)
        except RuntimeError as error:
            return {"error": str(error)}
        return {"error": None}
    if name == "lsgd_multi":
        return _fit(rank, world_size, LSGDStrategy(**MULTI, final_sync=False, timeout=TIMEOUT))
    if name == "easgd":
        return _fit(rank, world_size, _easgd())
    if name == "easgd_eamsgd":
        return _fit(rank, world_size, _easgd(momentum_rule="eamsgd"), make_model=models.NesterovRegressor)
    if name == "easgd_eamsgd_resume":
        strategy = lambda: _easgd(tau=4, momentum_rule="eamsgd")  # noqa: E731
        return _resume_pair(rank, world_size, out, strategy, make_model=models.NesterovRegressor)
    if name == "easgd_eval_center":
        return _fit(rank, world_size, _easgd(), val=True, val_check_interval=VAL_EVERY)
    if name == "easgd_final_sync":
        return _fit(rank, world_size, _easgd(final_sync=True))
    if name == "easgd_resume":
        return _resume_pair(rank, world_size, out, lambda: _easgd(tau=4))
    if name == "dataparallel":
        return _fit(rank, world_size, DataParallelStrategy(timeout=TIMEOUT))
    if name == "ddp":
        return _fit(rank, world_size, pl.strategies.DDPStrategy(timeout=TIMEOUT))
    if name.startswith("bytes_"):  # a model without buffers: d float32 parameters, nothing else
        strategy = {
            "bytes_lsgd": lambda: _lsgd(tau=4),
            "bytes_easgd": lambda: _easgd(tau=4),
            "bytes_dataparallel": lambda: DataParallelStrategy(timeout=TIMEOUT),
        }[name]()
        return _fit(rank, world_size, strategy, make_model=lambda: models.Regressor(with_buffers=False), max_steps=8)
    raise KeyError(name)


def run_scenarios(
    rank: int,
    world_size: int,
    out: str,
    names: list[str],
    run: Any = None,
    ignore: type[Warning] = DeprecationWarning,
) -> None:
    """Run the named scenarios of ``run`` (default: this module's :func:`scenario`) and save each rank's result;
    warnings of the ``ignore`` category (``Warning``: all) are silenced."""
    warnings.filterwarnings("ignore", category=ignore)
    for name in names:
        directory = Path(out) / name
        directory.mkdir(parents=True, exist_ok=True)
        result = (run or scenario)(name, rank, world_size, directory)
        torch.save(result, directory / f"rank{rank}.pt")
