"""The LSGD paper's evaluated model and Algorithm 1's multi-leader order, on 4 gloo workers, against the simulation.

Every LSGD figure of the paper (Teng et al. 2019) reports the test error of the workers' average, with BatchNorm
statistics re-estimated on training batches (the authors' code). ``LSGDStrategy(eval_on="average")`` must validate,
test, checkpoint (main file) and final-sync exactly that average; ``bn_recalibration_batches=N`` re-estimates the
average's BatchNorm statistics on N training batches of every rank first. Multi-leader LSGD applies, by default, the
local pull and then the global pull on its result (Algorithm 1). One job runs the scenarios of
``tests/scenarios.py``; ``tests/simulation.py`` replays the same workers, shards and rules in one process.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import models
from tests import simulation as sim
from tests.multiproc import rank_results, scenario_job
from tests.scenarios import BN_BATCHES, LSGD, MULTI_SEQUENTIAL, STEPS, VAL_EVERY, run_scenarios
from tests.test_distributed import assert_states_close, assert_tested_after_fit

WORLD = 4
SCENARIOS = ["lsgd_eval_average", "lsgd_eval_average_bn", "lsgd_average_save_test", "lsgd_multi_sequential"]
STEPS_PER_EPOCH = models.N_TRAIN // WORLD // models.BATCH  # 6
GROUPS = [[0, 1], [2, 3]]


job = scenario_job("average", run_scenarios, WORLD, SCENARIOS, timeout_s=400)


def results(job: Path, name: str) -> list[dict[str, Any]]:
    return rank_results(job, name, WORLD)


Evaluate = Callable[[list[sim.Worker], int], float]


def average_loss(workers: list[sim.Worker], step: int) -> float:
    return sim.val_loss_of(models.Net(), sim.average_state(workers, 0), WORLD)


def leader_loss(workers: list[sim.Worker], step: int) -> float:
    leader, _ = sim.elect(workers, LSGD["leader_window"])
    assert leader is not None
    return sim.val_loss_of(models.Net(), workers[leader].net.state_dict(), WORLD)


def epoch_of(step: int) -> int:
    """The sampler's epoch during (and right after) optimizer step ``step`` (1-based)."""
    return (step - 1) // STEPS_PER_EPOCH


def recalibrated(workers: list[sim.Worker], step: int) -> dict[str, torch.Tensor]:
    return sim.recalibrated_average(workers, models.BatchNormNet, BN_BATCHES, epoch_of(step), rank=0)


def simulate_lsgd(
    make_module: Callable[[], Any] = models.Regressor, evaluate: Evaluate | None = None
) -> tuple[list[sim.Worker], list[float]]:
    """Single-leader LSGD for STEPS steps; ``evaluate(workers, step)`` after every VAL_EVERY-th step's round."""
    workers = sim.make_workers_of(make_module, WORLD)
    vals = []
    for step in range(1, STEPS + 1):
        for worker in workers:
            sim.local_step(worker)
        if step % LSGD["tau"] == 0:
            sim.lsgd_round(workers, LSGD["pull_strength"], LSGD["leader_window"])
        if evaluate is not None and step % VAL_EVERY == 0:
            vals.append(evaluate(workers, step))
    return workers, vals


def simulate_multi(sequential: bool, evaluate: Evaluate | None = None) -> tuple[list[sim.Worker], list, list[float]]:
    """Multi-leader LSGD (2 groups of 2) in Algorithm 1's order or, with ``sequential=False``, eq. 2's."""
    workers = sim.make_workers(WORLD)
    rounds, vals = [], []
    for step in range(1, STEPS + 1):
        for worker in workers:
            sim.local_step(worker)
        if step % MULTI_SEQUENTIAL["local_tau"] == 0:
            both = step % MULTI_SEQUENTIAL["tau"] == 0
            round_ = sim.sequential_multi_leader_round if sequential else sim.multi_leader_round
            settings = (MULTI_SEQUENTIAL["local_pull_strength"], MULTI_SEQUENTIAL["pull_strength"])
            rounds.append({"step": step, **round_(workers, GROUPS, *settings, MULTI_SEQUENTIAL["leader_window"], both)})
        if evaluate is not None and step % VAL_EVERY == 0:
            vals.append(evaluate(workers, step))
    return workers, rounds, vals


# ----------------------------------------------------------------------------------------------------------------
# eval_on="average"
# ----------------------------------------------------------------------------------------------------------------
def test_lsgd_validates_exactly_the_workers_average_and_final_syncs_it(job: Path) -> None:
    got = results(job, "lsgd_eval_average")
    workers, vals = simulate_lsgd(evaluate=average_loss)
    assert len(vals) == STEPS // VAL_EVERY
    assert vals != pytest.approx(simulate_lsgd(evaluate=leader_loss)[1], rel=1e-3), "fixture must tell them apart"
    average = sim.average_state(workers, 0)
    for rank, result in enumerate(got):
        assert result["val"] == pytest.approx(vals, rel=1e-5), f"rank {rank}"
        # training went on undisturbed by the evaluations: the final sync hands everyone the simulated average
        assert_states_close(result["state"], average, f"rank {rank} after the final sync")


def test_the_checkpoint_and_test_after_fit_hold_the_average_and_every_rank_keeps_its_weights(job: Path) -> None:
    got = results(job, "lsgd_average_save_test")
    workers, _ = simulate_lsgd()
    average = sim.average_state(workers, 0)
    main = {key.removeprefix("net."): value for key, value in got[0]["main"].items()}
    assert_states_close(main, average, "the checkpoint's main file")
    assert got[0]["main_holds"] == "average"  # what a resume with another number of workers says it starts from
    expected = sim.val_loss_of(models.Net(), average, WORLD)
    assert_tested_after_fit(got, expected, workers)


def test_batchnorm_statistics_of_the_average_are_reestimated_on_training_batches(job: Path) -> None:
    got = results(job, "lsgd_eval_average_bn")

    def evaluate(workers: list[sim.Worker], step: int) -> float:
        return sim.val_loss_of(models.BatchNormNet(), recalibrated(workers, step), WORLD)

    workers, vals = simulate_lsgd(models.BatchNormRegressor, evaluate)
    plain = simulate_lsgd(
        models.BatchNormRegressor, lambda w, s: sim.val_loss_of(models.BatchNormNet(), sim.average_state(w, 0), WORLD)
    )[1]
    assert vals != pytest.approx(plain, rel=1e-3), "fixture must tell re-estimated statistics from averaged ones"
    final = recalibrated(workers, STEPS)
    for rank, result in enumerate(got):
        assert result["val"] == pytest.approx(vals, rel=1e-5), f"rank {rank}"
        assert_states_close(result["state"], final, f"rank {rank} after the final sync")


# ----------------------------------------------------------------------------------------------------------------
# Multi-leader LSGD: Algorithm 1's order (the default)
# ----------------------------------------------------------------------------------------------------------------
def test_multi_leader_default_order_matches_the_sequential_simulation(job: Path) -> None:
    got = results(job, "lsgd_multi_sequential")
    workers, rounds, vals = simulate_multi(sequential=True, evaluate=average_loss)
    assert any(r["global"] is not None for r in rounds) and any(r["global"] is None for r in rounds)
    simultaneous, _, _ = simulate_multi(sequential=False)
    moved = max(
        float((a.net.state_dict()[k] - b.net.state_dict()[k]).abs().max())
        for a, b in zip(workers, simultaneous)
        for k in a.net.state_dict()
        if a.net.state_dict()[k].is_floating_point()
    )
    assert moved > 1e-3, "fixture must tell the two orders apart"
    for rank, result in enumerate(got):
        assert_states_close(result["state"], workers[rank].net.state_dict(), f"rank {rank} final weights")
        assert result["val"] == pytest.approx(vals, rel=1e-5), f"rank {rank}: validation on the average"
        assert [r["step"] for r in result["rounds"]] == [r["step"] for r in rounds]
        assert [int(r["lsgd/local_leader"]) for r in result["rounds"]] == [r["local"][rank] for r in rounds]
        logged_global = [int(r["lsgd/leader"]) if "lsgd/leader" in r else None for r in result["rounds"]]
        assert logged_global == [r["global"] for r in rounds]
        for logged, expected in zip(result["rounds"], rounds):
            assert logged["lsgd/dist_to_local_leader"] == pytest.approx(expected["to_local"][rank], rel=1e-4, abs=1e-6)
            if expected["global"] is not None:
                assert logged["lsgd/dist_to_leader"] == pytest.approx(expected["to_global"][rank], rel=1e-4, abs=1e-6)
