"""Asynchronous LSGD's multi-leader form (Teng et al. 2019, Algorithm 1 with local leaders) on 4 gloo workers in
2 groups of 2, rank 1 slowed down.

One job runs both pull orders (``tests/lsgd_async_scenarios.py``, ``groups_*``). Local rounds fire every
P·local_tau steps of the whole job, global ones every P·tau; the tests check that every worker joined every round
at the right count, and compare the weights with a single-process replay of the recorded step counts
(``tests/async_simulation.replay_algorithm1`` with ``groups``), which must tell the two orders and a missing local
pull apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lsgd_lightning import AsyncLSGDStrategy
from tests import async_simulation as asim
from tests import simulation as sim
from tests.lsgd_async_scenarios import GROUP_STEPS, GROUPS, run_lsgd_async_scenarios
from tests.multiproc import rank_results, scenario_job
from tests.test_distributed import assert_states_close

WORLD = 4
LAYOUT = [[0, 1], [2, 3]]
LOCAL_PERIOD, GLOBAL_PERIOD = WORLD * GROUPS["local_tau"], WORLD * GROUPS["tau"]  # steps of the job between rounds
LOCAL_ROUNDS, GLOBAL_ROUNDS = WORLD * GROUP_STEPS // LOCAL_PERIOD, WORLD * GROUP_STEPS // GLOBAL_PERIOD  # 6, 3

job = scenario_job(
    "lsgd_async_groups", run_lsgd_async_scenarios, WORLD, ["groups_sequential", "groups_simultaneous"], timeout_s=420
)


def rounds_of(job: Path, order: str) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """What every rank saved and, per round (local, with or without a global one), every rank's step count."""
    got = rank_results(job, f"groups_{order}", WORLD)
    return got, asim.algorithm1_rounds(got, number="lsgd/local_round")  # asserts every rank joined every round


def replay(rounds: list[list[int]], **settings: Any) -> list[sim.Worker]:
    workers, _ = asim.replay_algorithm1(
        rounds, {**GROUPS, **settings}, WORLD, GROUP_STEPS, groups=LAYOUT, final_election=settings.get("final", False)
    )
    return workers


def states_close(got: list[dict[str, Any]], workers: list[sim.Worker]) -> bool:
    try:
        for rank, result in enumerate(got):
            assert_states_close(result["state"], workers[rank].net.state_dict(), f"rank {rank}")
    except AssertionError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# When rounds fire and who takes part
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["sequential", "simultaneous"])
def test_every_worker_joins_every_local_and_global_round_at_the_jobs_step_count(job: Path, order: str) -> None:
    got, rounds = rounds_of(job, order)
    assert len(rounds) == LOCAL_ROUNDS == 6
    for k, steps in enumerate(rounds, start=1):  # local round k: k·P·local_tau steps, up to one more per worker
        assert k * LOCAL_PERIOD <= sum(steps) <= k * LOCAL_PERIOD + WORLD - 1, (k, steps)
    global_rounds = [steps for k, steps in enumerate(rounds, start=1) if k * GROUPS["local_tau"] % GROUPS["tau"] == 0]
    assert len(global_rounds) == GLOBAL_ROUNDS == 3
    for g, steps in enumerate(global_rounds, start=1):
        assert g * GLOBAL_PERIOD <= sum(steps) <= g * GLOBAL_PERIOD + WORLD - 1, (g, steps)
    assert any(len(set(steps)) > 1 for steps in rounds), f"the workers never were at different steps: {rounds}"
    for result in got:
        assert (result["rounds_joined"], result["local_rounds_joined"], result["steps"]) == (3, 6, GROUP_STEPS)
        flags = [bool(r["lsgd/global"]) for r in result["history"]]
        assert flags == [False, True] * 3
        assert [int(r["lsgd/round"]) for r in result["history"]] == [0, 1, 1, 2, 2, 3]


# ----------------------------------------------------------------------------------------------------------------
# The rule, against the replay
# ----------------------------------------------------------------------------------------------------------------
def test_sequential_order_matches_the_replay_and_not_a_different_rule(job: Path) -> None:
    """Algorithm 1's order (the default): local pull, then the global pull on its result. The same recorded rounds
    replayed with eq. 2's order, or without the local pull, end elsewhere: the comparison can fail."""
    got, rounds = rounds_of(job, "sequential")
    _, outcomes = asim.replay_algorithm1(rounds, GROUPS, WORLD, GROUP_STEPS, groups=LAYOUT)
    assert states_close(got, replay(rounds))
    for rank, result in enumerate(got):
        for k, (record, outcome) in enumerate(zip(result["history"], outcomes, strict=True), start=1):
            assert outcome is not None
            assert record["lsgd/local_leader"] == outcome["local"][rank], (k, rank)
            assert record.get("lsgd/leader") == outcome["global"], (k, rank)
            torch.testing.assert_close(
                record["lsgd/dist_to_local_leader"], outcome["to_local"][rank], rtol=1e-4, atol=1e-6
            )
    leaders = [o["local"] for o in outcomes if o is not None]
    assert any(local[0] != local[2] for local in leaders)  # two different local leaders: the groups are real
    assert not states_close(got, replay(rounds, pull_order="simultaneous"))
    assert not states_close(got, replay(rounds, local_pull_strength=0.0))


def test_simultaneous_order_matches_the_replay_and_every_worker_ends_on_the_newest_global_leader(job: Path) -> None:
    """pull_order="simultaneous" (the poster's eq. 2), with final_sync: every worker ends on the weights of the
    leader of a last election over all final scores."""
    got, rounds = rounds_of(job, "simultaneous")
    assert states_close(got, replay(rounds, pull_order="simultaneous", final=True))
    assert not states_close(got, replay(rounds, pull_order="sequential", final=True))
    for result in got[1:]:
        for key, value in result["state"].items():
            assert torch.equal(value, got[0]["state"][key]), key


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------
def test_checkpoint_and_resume_continue_both_round_counts_as_the_replay_says(job: Path) -> None:
    """The sequential run saved a checkpoint per epoch (6 steps of each worker, 24 of the job: local rounds 1-3,
    global round 1); the run resumed from the first one joins local rounds 4-6 (4 and 6 also global)."""
    got, rounds = rounds_of(job, "sequential")
    per_epoch = GROUP_STEPS // 2
    before = [steps for steps in rounds if sum(steps) <= WORLD * per_epoch]
    assert len(before) == 3  # saved at the epoch's end: every due round joined
    workers, _ = asim.replay_algorithm1(before, GROUPS, WORLD, per_epoch, groups=LAYOUT)
    path = job / "groups_sequential" / "a" / "epoch=0.ckpt"
    for rank in range(WORLD):
        shard = torch.load(Path(f"{path}.shards") / f"rank_{rank:05d}.pt", weights_only=True)
        state = shard["strategy_state"]
        assert (state["steps"], state["extra"]) == (per_epoch, {"rounds_joined": 1, "local_rounds_joined": 3})
        own = {k.removeprefix("net."): v for k, v in shard["state_dict"].items()}
        assert_states_close(own, workers[rank].net.state_dict(), f"shard {rank}")
    resumed = [result["resumed"] for result in got]
    after = asim.algorithm1_rounds(resumed, number="lsgd/local_round")
    for k, steps in enumerate(after, start=4):
        assert k * LOCAL_PERIOD <= sum(steps) <= k * LOCAL_PERIOD + WORLD - 1, (k, steps)
    assert [int(r["lsgd/local_round"]) for r in resumed[0]["history"]] == [4, 5, 6]
    assert [bool(r["lsgd/global"]) for r in resumed[0]["history"]] == [True, False, True]
    workers, _ = asim.replay_algorithm1(
        after, GROUPS, WORLD, GROUP_STEPS, workers=workers, groups=LAYOUT, first_round=4
    )
    assert states_close(resumed, workers)
    for result in resumed:
        assert (result["rounds_joined"], result["local_rounds_joined"]) == (GLOBAL_ROUNDS, LOCAL_ROUNDS)


# ----------------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"group_size": 2, "variant": "board"}, "group_size=2 needs variant='algorithm1'"),
        ({"local_tau": 2}, r"local_tau needs group_size \('node' or an int\)"),
        ({"pull_order": "simultaneous"}, "pull_order needs group_size"),
        ({"group_size": 2, "tau": 6, "local_tau": 4}, r"tau \(6\) must be a multiple of local_tau \(4\)"),
        ({"group_size": 0}, "group_size must be None, 'node' or an integer >= 1"),
        ({"group_size": 2, "local_pull_strength": 1.5}, "local_pull_strength"),
        ({"group_size": 2, "pull_order": "both"}, "pull_order must be 'sequential' or 'simultaneous'"),
        (
            {"group_size": 2, "pull_order": "simultaneous", "local_pull_strength": 0.5, "pull_strength": 0.6},
            r"pull_order='simultaneous' needs local_pull_strength \+ pull_strength <= 1",
        ),
    ],
)
def test_bad_group_settings_are_refused_at_construction(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        AsyncLSGDStrategy(**kwargs)


def test_group_defaults_follow_lsgd_multi() -> None:
    strategy = AsyncLSGDStrategy(tau=16, pull_strength=0.2, group_size="node")
    assert (strategy.local_tau, strategy.local_pull_strength, strategy.pull_order) == (4, 0.2, "sequential")
    # the same strengths in Algorithm 1's order are a convex combination: accepted
    assert AsyncLSGDStrategy(group_size=2, local_pull_strength=0.5, pull_strength=0.6).pull_order == "sequential"
    assert AsyncLSGDStrategy().group_size is None


def test_a_group_size_that_does_not_divide_the_workers_is_refused_by_the_trainer() -> None:
    with pytest.raises(ValueError, match=r"group_size=2 \(2 ranks per group\) must divide the number of workers"):
        pl.Trainer(accelerator="cpu", devices=3, strategy=AsyncLSGDStrategy(group_size=2), logger=False)
