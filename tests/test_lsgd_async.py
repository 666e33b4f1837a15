"""Asynchronous LSGD's default, the paper's Algorithm 1 (Teng et al. 2019), on 2 gloo workers, one of them slowed.

One job runs the scenarios of ``tests/lsgd_async_scenarios.py``; the tests check when rounds fired (every P·tau steps
of the whole job, every worker present) and compare the weights with a single-process replay of the recorded step
counts (``tests/async_simulation.replay_algorithm1``). The leader-board variant is tested in ``tests/test_async.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lsgd_lightning import AsyncLSGDStrategy
from tests import async_simulation as asim
from tests import models
from tests import simulation as sim
from tests.lsgd_async_scenarios import ALGORITHM1, RESUME_EPOCHS, STEPS, run_lsgd_async_scenarios
from tests.multiproc import rank_results, scenario_job
from tests.test_distributed import assert_states_close

WORLD = 2
PERIOD = WORLD * ALGORITHM1["tau"]  # steps of the job between rounds
SCENARIOS = [
    "algorithm1",
    "algorithm1_final_sync",
    "algorithm1_eval_average",
    "algorithm1_diverge",
    "algorithm1_manual",
    "algorithm1_resume",
]
STEPS_PER_EPOCH = 12  # 96 samples, batch 4, 2 workers


job = scenario_job("lsgd_async", run_lsgd_async_scenarios, WORLD, SCENARIOS, timeout_s=420)


def results(job: Path, name: str) -> list[dict[str, Any]]:
    return rank_results(job, name, WORLD)


def check_round_schedule(rounds: list[list[int]], first_round: int = 1) -> None:
    """Round k fires when the job's step count reaches k·P·tau; the others join after the step they are in."""
    for k, steps in enumerate(rounds, start=first_round):
        assert k * PERIOD <= sum(steps) <= k * PERIOD + WORLD - 1, (k, steps)


# ----------------------------------------------------------------------------------------------------------------
# When rounds fire and who takes part
# ----------------------------------------------------------------------------------------------------------------
def test_every_worker_joins_every_round_fired_by_the_jobs_step_count(job: Path) -> None:
    got = results(job, "algorithm1")
    rounds = asim.algorithm1_rounds(got)  # asserts that every rank recorded every round
    assert len(rounds) == WORLD * STEPS // PERIOD == 5
    check_round_schedule(rounds)
    for result in got:
        assert result["rounds_joined"] == 5 and result["steps"] == STEPS


def test_the_fast_worker_makes_more_steps_between_rounds(job: Path) -> None:
    """The straggler holds after its step 2 until the fast worker finished step 3, so round 1 (at 6 steps of the
    job) finds the straggler at 3 steps or fewer and the fast worker, which joins after the step it is in, at 4 or
    more; lockstep rounds would give (3, 3)."""
    rounds = asim.algorithm1_rounds(results(job, "algorithm1"))
    fast, slow = rounds[0]
    assert fast >= 4 and slow <= 3, rounds


def test_a_worker_that_finished_keeps_joining_rounds(job: Path) -> None:
    """The last round fires at the later worker's last step (2 · 15 = 5 · 6): the other one had finished and
    joined it while waiting for the end."""
    rounds = asim.algorithm1_rounds(results(job, "algorithm1"))
    assert rounds[-1] == [STEPS, STEPS]


def test_algorithm1_matches_the_replay(job: Path) -> None:
    got = results(job, "algorithm1")
    workers, outcomes = asim.replay_algorithm1(asim.algorithm1_rounds(got), ALGORITHM1, WORLD, STEPS)
    for rank, result in enumerate(got):
        assert_states_close(result["state"], workers[rank].net.state_dict(), f"rank {rank}")
        for record, outcome in zip(result["history"], outcomes):
            assert outcome is not None
            assert record["lsgd/leader"] == outcome["leader"]
            torch.testing.assert_close(record["lsgd/leader_score"], outcome["leader_score"], rtol=1e-5, atol=1e-6)
            if rank != outcome["leader"]:  # the leader does not move; everyone else is pulled
                torch.testing.assert_close(
                    record["lsgd/dist_to_leader"], outcome["distances"][rank], rtol=1e-4, atol=1e-6
                )


def test_manual_optimization_joins_the_same_rounds(job: Path) -> None:
    got = results(job, "algorithm1_manual")
    rounds = asim.algorithm1_rounds(got)
    check_round_schedule(rounds)
    workers, _ = asim.replay_algorithm1(rounds, ALGORITHM1, WORLD, STEPS)
    for rank, result in enumerate(got):
        assert_states_close(result["state"], workers[rank].net.state_dict(), f"rank {rank}")


def test_a_diverged_worker_is_reset_to_the_leader_at_the_next_round(job: Path) -> None:
    got = results(job, "algorithm1_diverge")
    rounds = asim.algorithm1_rounds(got)
    workers, _ = asim.replay_algorithm1(rounds, ALGORITHM1, WORLD, STEPS, poison=(1, 4))
    for rank, result in enumerate(got):
        assert_states_close(result["state"], workers[rank].net.state_dict(), f"rank {rank}")
        assert all(bool(torch.isfinite(v).all()) for v in result["state"].values() if v.is_floating_point())
    resets = [r["health/resets"] for r in got[1]["rounds"]]
    assert resets and resets[-1] == 1 and got[0]["rounds"][-1]["health/resets"] == 0


def test_evaluation_and_final_sync_use_the_newest_leader(job: Path) -> None:
    """Validation meets every 3 steps (rounds due meanwhile are joined while waiting); at the end every worker
    holds the leader's current weights, elected over the final scores (not an older copy)."""
    got = results(job, "algorithm1_final_sync")
    rounds = asim.algorithm1_rounds(got)
    check_round_schedule(rounds)
    workers, _ = asim.replay_algorithm1(rounds, ALGORITHM1, WORLD, STEPS, final_election=True)
    for rank, result in enumerate(got):
        assert len(result["val"]) == STEPS // 3
        assert result["val"] == got[0]["val"]  # every rank validated the same (leader) model
        assert_states_close(result["state"], workers[rank].net.state_dict(), f"rank {rank}")
        for key, value in result["reference_after_fit"].items():
            assert torch.equal(value, got[0]["reference_after_fit"][key]), key


def test_eval_on_average_evaluates_and_final_syncs_exactly_the_mean_of_every_workers_current_weights(
    job: Path,
) -> None:
    """Validation meets every 3 steps: what every rank evaluates is the mean of both workers' weights at that
    meeting (floating-point buffers included), its loss the loss of that mean; the final sync hands everyone the
    mean of the replayed workers' final weights."""
    got = results(job, "algorithm1_eval_average")
    rounds = asim.algorithm1_rounds(got)
    check_round_schedule(rounds)
    probes = [result["probe"] for result in got]
    assert len(probes[0]) == len(probes[1]) == STEPS // 3
    for k, seen in enumerate(zip(*probes)):
        mean = {
            name: (sum(s["own"][name].double() for s in seen) / WORLD).float()
            for name, value in seen[0]["own"].items()
            if value.is_floating_point()
        }
        assert any(not torch.equal(seen[0]["own"][n], seen[1]["own"][n]) for n in mean), "the workers must differ"
        for rank, s in enumerate(seen):
            for name, value in mean.items():
                msg = f"validation {k}, rank {rank}: {name}"
                torch.testing.assert_close(s["evaluated"][name], value, rtol=1e-6, atol=1e-7, msg=msg)
        state = {name.removeprefix("net."): value for name, value in seen[0]["evaluated"].items()}
        expected = sim.val_loss_of(models.Net(), state, WORLD)
        assert [result["val"][k] for result in got] == pytest.approx([expected] * WORLD, rel=1e-5)
    workers, _ = asim.replay_algorithm1(rounds, ALGORITHM1, WORLD, STEPS)
    average = sim.average_state(workers, 0)
    for rank, result in enumerate(got):
        assert_states_close(result["state"], average, f"rank {rank} after the final sync")


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------
def test_checkpoint_and_resume_continue_the_round_count_as_the_replay_says(job: Path) -> None:
    pair = results(job, "algorithm1_resume")
    first, resumed = [p["uninterrupted"] for p in pair], [p["resumed"] for p in pair]
    before = [r for r in asim.algorithm1_rounds(first) if sum(r) <= WORLD * STEPS_PER_EPOCH]
    assert len(before) == WORLD * STEPS_PER_EPOCH // PERIOD  # saved at the epoch's end: every due round joined
    path = job / "algorithm1_resume" / "a" / "epoch=0.ckpt"
    workers, _ = asim.replay_algorithm1(before, ALGORITHM1, WORLD, STEPS_PER_EPOCH)
    for rank in range(WORLD):
        shard = torch.load(Path(f"{path}.shards") / f"rank_{rank:05d}.pt", weights_only=True)
        assert shard["strategy_state"]["steps"] == STEPS_PER_EPOCH
        own = {k.removeprefix("net."): v for k, v in shard["state_dict"].items()}
        assert_states_close(own, workers[rank].net.state_dict(), f"shard {rank}")
    after = asim.algorithm1_rounds(resumed)
    check_round_schedule(after, first_round=len(before) + 1)
    total = RESUME_EPOCHS * STEPS_PER_EPOCH
    workers, _ = asim.replay_algorithm1(after, ALGORITHM1, WORLD, total, workers=workers)
    for rank, result in enumerate(resumed):
        assert result["rounds_joined"] == WORLD * total // PERIOD
        assert_states_close(result["state"], workers[rank].net.state_dict(), f"resumed rank {rank}")


# ----------------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------------
def test_an_unknown_variant_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="variant must be 'algorithm1' or 'board', got 'paper'"):
        AsyncLSGDStrategy(variant="paper")


def test_the_default_is_the_papers_algorithm() -> None:
    assert AsyncLSGDStrategy().variant == "algorithm1"


def test_multi_leader_settings_need_algorithm1() -> None:
    """The multi-leader form is tested in ``tests/test_lsgd_async_groups.py``; the board keeps one leader copy."""
    with pytest.raises(ValueError, match="group_size=2 needs variant='algorithm1'.* Use group_size=None"):
        AsyncLSGDStrategy(group_size=2, local_tau=4, variant="board")
