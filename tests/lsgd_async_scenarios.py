"""Asynchronous LSGD's Algorithm 1 (the default ``variant``), run inside each worker process of a 2-worker job, and
its multi-leader form (``groups_*``) in a 4-worker job with groups of 2 (``tests/test_lsgd_async_groups.py``).

Rank 1 is a straggler (a sleep after each of its steps, and a hold early on until the fast worker is ahead), so the
fast worker contributes more of the job's steps between rounds. Each rank saves the strategy's ``round_history``:
for every round it joined, the round number (with groups: local and global) and its own step count at that moment,
which is all the replay in ``tests/async_simulation.py`` needs (between rounds a worker only trains on its own
shard).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lsgd_lightning import AsyncLSGDStrategy
from tests import models
from tests.async_scenarios import Straggler, _checkpointer
from tests.scenarios import TIMEOUT, _fit, run_scenarios

ALGORITHM1 = {"tau": 3, "pull_strength": 0.3, "leader_window": 2}  # rounds every 2 * 3 steps of the job
STEPS = 15  # 5 rounds; the last one fires at the later worker's last step, the other one has finished and waits
# The multi-leader form on 4 workers in groups of 2: local rounds every 4 * 2 steps of the job, global every 4 * 4.
GROUPS = {**ALGORITHM1, "tau": 4, "group_size": 2, "local_tau": 2, "local_pull_strength": 0.4}
GROUP_STEPS = 12  # 6 local rounds, 3 of them global; the last at the job's last step
SLOW_S = 0.25
RESUME_EPOCHS = 2


class EvaluatedProbe(pl.Callback):
    """At each validation's first batch (the evaluated weights swapped in): the module's weights and this rank's own
    (the strategy keeps them aside while it evaluates), by parameter name."""

    def __init__(self) -> None:
        self.seen: list[dict[str, dict[str, torch.Tensor]]] = []

    def on_validation_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        if args[1] != 0 or trainer.sanity_checking:  # batch_idx
            return
        strategy = trainer.strategy
        evaluated = {k: v.detach().clone() for k, v in module.state_dict().items()}
        own = strategy.layout.named_tensors(strategy._stashed_own)  # type: ignore[attr-defined]
        self.seen.append({"evaluated": evaluated, "own": {k: v.detach().clone() for k, v in own.items()}})


def make(**overrides: Any) -> AsyncLSGDStrategy:
    return AsyncLSGDStrategy(**{**ALGORITHM1, "final_sync": False, "timeout": TIMEOUT, **overrides})


def _run(
    rank: int, world_size: int, strategy: AsyncLSGDStrategy, hold: tuple[int, int] = (2, 3), **kwargs: Any
) -> dict[str, Any]:
    # The straggler holds after its step 2 until the fast worker has finished its step 3 (no round fires in
    # between: 2 + 3 < 6), then sleeps after every step.
    extra = [Straggler(1, SLOW_S, hold), *kwargs.pop("extra_callbacks", [])]
    kwargs.setdefault("max_steps", STEPS)
    result = _fit(rank, world_size, strategy, extra_callbacks=extra, **kwargs)
    joined = {"rounds_joined": strategy.rounds_joined, "local_rounds_joined": strategy.local_rounds_joined}
    return {**result, "history": list(strategy.round_history), **joined}


def scenario(name: str, rank: int, world_size: int, out: Path) -> dict[str, Any]:
    if name.startswith("groups_"):  # 4 workers in 2 groups; the straggler holds after its step 1 until a fast
        # worker has finished its step 2 (then at most 1 + 3 * 2 = 7 < 8 steps of the job: no round in between)
        order = name.removeprefix("groups_")
        if order == "simultaneous":  # and the final sync
            strategy = make(**GROUPS, pull_order=order, final_sync=True)
            return _run(rank, world_size, strategy, hold=(1, 2), max_steps=GROUP_STEPS)
        # Algorithm 1's order: 2 epochs of 6 steps, a checkpoint per epoch, then again from the epoch-0 checkpoint
        common: dict[str, Any] = {"hold": (1, 2), "max_steps": -1, "max_epochs": 2, "enable_checkpointing": True}
        first = _run(rank, world_size, make(**GROUPS), extra_callbacks=[_checkpointer(out / "a")], **common)
        path = str(out / "a" / "epoch=0.ckpt")
        again = _run(
            rank, world_size, make(**GROUPS), ckpt_path=path, extra_callbacks=[_checkpointer(out / "b")], **common
        )
        return {**first, "resumed": again}
    if name == "algorithm1":
        return _run(rank, world_size, make())
    if name == "algorithm1_final_sync":  # validation every 3 steps of each worker, and the final sync
        strategy = make(final_sync=True)
        result = _run(rank, world_size, strategy, val=True, val_check_interval=3)
        return {**result, "reference_after_fit": strategy.layout.named_tensors(strategy._reference_weights())}
    if name == "algorithm1_eval_average":  # eval_on="average": validation and final sync on the workers' mean
        probe = EvaluatedProbe()
        strategy = make(final_sync=True, eval_on="average")
        result = _run(rank, world_size, strategy, val=True, val_check_interval=3, extra_callbacks=[probe])
        return {**result, "probe": probe.seen}
    if name == "algorithm1_diverge":  # rank 1's weights turn NaN before its step 4
        return _run(rank, world_size, make(), make_model=lambda: models.DivergingRegressor(rank=1, step=4))
    if name == "algorithm1_manual":  # manual optimization: the rounds run after training_step returned its loss
        return _run(rank, world_size, make(), make_model=models.ManualRegressor)
    if name == "algorithm1_resume":  # 2 epochs, a checkpoint per epoch, then again from the epoch-0 checkpoint
        common: dict[str, Any] = {
            "max_steps": -1,
            "max_epochs": RESUME_EPOCHS,
            "enable_checkpointing": True,
            "shuffle": True,
        }
        first = _run(rank, world_size, make(), extra_callbacks=[_checkpointer(out / "a")], **common)
        again = _run(
            rank,
            world_size,
            make(),
            ckpt_path=str(out / "a" / "epoch=0.ckpt"),
            extra_callbacks=[_checkpointer(out / "b")],
            **common,
        )
        return {"uninterrupted": first, "resumed": again}
    raise KeyError(name)


def run_lsgd_async_scenarios(rank: int, world_size: int, out: str, names: list[str]) -> None:
    run_scenarios(rank, world_size, out, names, run=scenario)
