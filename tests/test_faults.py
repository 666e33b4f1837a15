"""Faults that Lightning users reported against DDP, tried on every strategy (2 gloo workers on CPU).

One module-scoped job runs the scenarios of ``tests/fault_scenarios.py``; the tests check what each rank saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lsgd_lightning.strategies.checkpoints import shard_path
from tests import models
from tests.fault_scenarios import CHECKPOINT_EVAL, SIGTERM_RANK, SIGTERM_STEP, STRATEGIES, run_fault_scenarios
from tests.multiproc import rank_results, scenario_job

WORLD = 2
ASYNC = ("lsgd_async", "easgd_async", "downpour", "adpsgd")  # workers at different steps between meeting points
SCENARIOS = [
    *(f"ckpt_{name}" for name in CHECKPOINT_EVAL),
    *(f"sigterm_{name}" for name in STRATEGIES),
    *(f"metric_{name}" for name in ASYNC),
]


job = scenario_job("faults", run_fault_scenarios, WORLD, SCENARIOS, timeout_s=500)


def results(job: Path, name: str) -> list[dict[str, Any]]:
    return rank_results(job, name, WORLD, weights_only=False)


@torch.no_grad()
def full_loss(state_dict: dict[str, torch.Tensor]) -> float:
    """The validation loss of a checkpoint's weights on the whole validation set (what a synced log reports)."""
    model = models.Regressor()
    model.load_state_dict(state_dict)
    x, y = models.dataset(models.N_VAL, 1, WORLD)
    return float(model.net.loss(x, y, train=False))


@torch.no_grad()
def local_loss(path: str) -> float:
    """``eval_on="local"``: each rank evaluates its own shard on its half of the data; the synced log is the mean."""
    losses = []
    for rank in range(WORLD):
        shard = torch.load(shard_path(path, rank), weights_only=True)  # next to the real file, also for a link
        model = models.Regressor()
        model.load_state_dict(shard["state_dict"])
        x, y = models.dataset(models.N_VAL, 1, WORLD)
        losses.append(float(model.net.loss(x[rank::WORLD], y[rank::WORLD], train=False)))
    return sum(losses) / WORLD


@pytest.mark.parametrize("name", CHECKPOINT_EVAL)
def test_every_evaluation_of_a_checkpoint_sees_that_checkpoints_evaluated_model(job: Path, name: str) -> None:
    """The best and the last checkpoint (a symbolic link) in the Trainer that just fitted, a relative path, a copied
    folder and a fresh Trainer all evaluate the checkpoint's model (the main file; with eval_on="local", each rank's
    shard), never the model the fit ended with."""
    for result in results(job, f"ckpt_{name}"):
        best, last = result["best_path"], result["last_path"]
        assert Path(last).is_symlink()
        expected = local_loss if name.endswith("_local") else lambda p: full_loss(torch.load(p)["state_dict"])
        best_loss, last_loss = expected(best), expected(last)
        for key in ("same_best", "same_relative", "fresh_copied"):
            assert result[key] == pytest.approx(best_loss, rel=1e-5), key
        for key in ("same_last", "fresh_last"):
            assert result[key] == pytest.approx(last_loss, rel=1e-5), key


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_sigterm_to_one_rank_stops_every_rank_with_a_complete_checkpoint(job: Path, name: str) -> None:
    got = results(job, f"sigterm_{name}")
    for rank, result in enumerate(got):
        assert result["stopped_by"] == "SIGTERMException", f"rank {rank}"
        assert result["seconds"] < 45, f"rank {rank} waited {result['seconds']:.0f} s"
        assert result["checkpoint"] and result["shards"] in ([f"rank_{r:05d}.pt" for r in range(WORLD)], [])
    # A common batch, never before one that a worker had already started (its collectives would be skipped). The
    # synchronous strategies meet every 2 steps at most, so that is at most 2 past the signal; an asynchronous
    # worker may be any number of batches ahead (on a loaded machine the other one may start late).
    steps = [r["global_step"] for r in got]
    furthest = got[SIGTERM_RANK]["furthest_at_signal"]
    assert furthest is not None and furthest >= SIGTERM_STEP
    assert len(set(steps)) == 1 and steps[0] >= furthest, (steps, furthest)
    if name not in ASYNC:
        assert steps[0] <= SIGTERM_STEP + 2, steps
    if name != "dataparallel":  # DataParallel's checkpoint is Lightning's single file
        assert got[0]["shards"] == [f"rank_{r:05d}.pt" for r in range(WORLD)]


@pytest.mark.parametrize("name", ASYNC)
def test_a_metric_synced_at_epoch_end_waits_for_a_live_straggler(job: Path, name: str) -> None:
    for rank, result in enumerate(results(job, f"metric_{name}")):
        assert result["error"] is None, f"rank {rank}: {result['error']}"
        assert result["rank_mean"] == pytest.approx(0.5)  # the mean over both ranks: the sync happened
