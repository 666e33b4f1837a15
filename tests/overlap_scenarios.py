"""Overlapped and chain Leader SGD runs, inside each worker process of a multi-process test job.

Built on the helpers of ``tests/scenarios.py`` (same models, data, seed, timeouts); ``tests/test_lsgd_overlap.py``
compares what these runs save with its single-process simulation of the delayed pull.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from lsgd_lightning import LSGDStrategy
from tests import models
from tests.scenarios import VAL_EVERY, _expect_error, _fit, _lsgd, _resume_pair, run_scenarios

# tau=3, k=2: rounds after steps 3, 6, 9, 12; pulls after 5, 8, 11, 14 (the last on the run's last step).
OVERLAP = {"tau": 3, "overlap_steps": 2}
# tau=4, k=3: rounds after 4, 8, 12; pulls after 7, 11, and the third when fit ends at step 14 (before step 15).
OVERLAP_END = {"tau": 4, "overlap_steps": 3}
FAIL_STEP = 5  # FailingRegressor raises in the 6th training step, while the round of step 4 is in flight


class FailingRegressor(models.Regressor):
    """Raises on every rank in the training step that follows ``FAIL_STEP`` optimizer steps."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if self.global_step == FAIL_STEP:
            raise RuntimeError(f"boom after step {FAIL_STEP}")
        return super().training_step(batch, batch_idx)


class StepRecorder(pl.Callback):
    """After every training step: the round metrics and whether a round is in flight; at every validation (after
    the strategy's ``on_validation_start``): whether a round was in flight and whether its transfer still ran."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.validations: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        strategy = trainer.strategy
        assert isinstance(strategy, LSGDStrategy)
        in_flight = float(strategy.round_in_flight)
        self.steps.append({"step": float(trainer.global_step), "in_flight": in_flight, **strategy.round_metrics})

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.sanity_checking or args[1] != 0:  # args: batch, batch_idx
            return
        strategy = trainer.strategy
        assert isinstance(strategy, LSGDStrategy)
        running = strategy._in_flight is not None and not strategy._in_flight.arrived
        self.validations.append(
            {"step": float(trainer.global_step), "in_flight": float(strategy.round_in_flight), "running": running}
        )


def _recorded(rank: int, world_size: int, strategy: LSGDStrategy, **kwargs: Any) -> dict[str, Any]:
    recorder = StepRecorder()
    result = _fit(rank, world_size, strategy, extra_callbacks=[recorder], **kwargs)
    return {
        **result,
        "per_step": recorder.steps,
        "validations": recorder.validations,
        "in_flight_after": strategy.round_in_flight,
    }


def _failing(rank: int, world_size: int) -> dict[str, Any]:
    strategy = _lsgd(**OVERLAP_END)
    outcome = _expect_error(lambda: _fit(rank, world_size, strategy, make_model=FailingRegressor))
    return {**outcome, "in_flight_after": strategy.round_in_flight}


def overlap_scenario(name: str, rank: int, world_size: int, out: Path) -> dict[str, Any]:
    """One named run (the tests read the results by the same name)."""
    runs: dict[str, Any] = {
        "tree": lambda: _fit(rank, world_size, _lsgd()),
        "chain": lambda: _fit(rank, world_size, _lsgd(leader_broadcast="chain")),
        "overlap": lambda: _recorded(rank, world_size, _lsgd(**OVERLAP)),
        "overlap_val": lambda: _recorded(
            rank, world_size, _lsgd(**OVERLAP_END), val=True, val_check_interval=VAL_EVERY
        ),
        "overlap_final_sync": lambda: _recorded(rank, world_size, _lsgd(**OVERLAP_END, final_sync=True)),
        "overlap_manual_nan": lambda: _recorded(
            rank, world_size, _lsgd(**OVERLAP), make_model=lambda: models.ManualRegressor(report_nan_on=(1,))
        ),
        "overlap_resume": lambda: _resume_pair(rank, world_size, out, lambda: _lsgd(**OVERLAP_END)),
        "overlap_exception": lambda: _failing(rank, world_size),
    }
    return runs[name]()


def run_overlap_scenarios(rank: int, world_size: int, out: str, names: list[str]) -> None:
    run_scenarios(rank, world_size, out, names, run=overlap_scenario)
