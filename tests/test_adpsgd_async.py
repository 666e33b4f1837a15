"""AD-PSGD's asynchronous schedule (the default, Lian et al. 2018, Algorithm 1) on 4 gloo workers, one slowed.

One job runs the scenarios of ``tests/adpsgd_scenarios.py``; the tests check that the workers the slow one must not
hold up got far ahead of it, that every active's partners are its own seeded uniform draws, and compare the weights
with a single-process replay of the recorded averages (``tests/decentralized_simulation.adpsgd_replay``). The
deterministic ``schedule="lockstep"`` variant is tested in ``tests/test_decentralized.py``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from lsgd_lightning import ADPSGDStrategy
from lsgd_lightning.core.pairing import PartnerDraws, passive_neighbours
from tests import decentralized_simulation as sim
from tests.adpsgd_scenarios import AHEAD, STEPS, VAL_EVERY, run_adpsgd_scenarios
from tests.decentralized_scenarios import ADPSGD_SEED
from tests.multiproc import rank_results, scenario_job
from tests.test_decentralized import FLOAT_BYTES, assert_close

WORLD = 4
SCENARIOS = ["slow_active", "slow_passive", "meetings", "resume"]
STEPS_PER_EPOCH = 6  # 96 samples, batch 4, 4 workers


job = scenario_job("adpsgd_async", run_adpsgd_scenarios, WORLD, SCENARIOS, timeout_s=600)


def results(job: Path, name: str) -> list[dict[str, Any]]:
    return rank_results(job, name, WORLD)


def records(got: list[dict[str, Any]]) -> list[sim.Record]:
    """Every average of the run, checked to be recorded the same way by both of its workers."""
    seen = [{tuple(e) for e in result["exchanges"]} for result in got]
    for rank, mine in enumerate(seen):
        for record in mine:
            partner = record[2] if record[0] == rank else record[0]
            assert rank in (record[0], record[2]) and record in seen[partner], (rank, record)
    return sorted(set().union(*seen))


def check_partners(recorded: list[sim.Record], first_step: int = 1) -> None:
    """Each active averaged once per step, with the partner of its own stream of uniform draws:
    ``random.Random(f"adpsgd:{seed}:rank:{rank}")`` over its sorted passive neighbours (written out here)."""
    for active in range(0, WORLD, 2):
        mine = sorted((r[1], r[2]) for r in recorded if r[0] == active)
        steps = [step for step, _ in mine]
        assert steps == list(range(first_step, first_step + len(steps))), (active, steps)
        rng = random.Random(f"adpsgd:{ADPSGD_SEED}:rank:{active}")
        neighbours = sorted({(active - 1) % WORLD, (active + 1) % WORLD})
        expected = [neighbours[rng.randrange(2)] for _ in range(first_step + len(steps) - 1)][first_step - 1 :]
        assert [passive for _, passive in mine] == expected, active


# ----------------------------------------------------------------------------------------------------------------
# Nobody waits for a worker that is not its partner of the moment
# ----------------------------------------------------------------------------------------------------------------
def test_no_worker_waits_for_a_slow_active(job: Path) -> None:
    """Rank 2 (active) holds after its step 2 until the three others have started batch AHEAD + 1: passives serve
    it when they get to it and the other active never pairs with it. A global step would keep them at 3."""
    got = results(job, "slow_active")
    assert min(got[2]["ahead_seen"]) > AHEAD, got[2]["ahead_seen"]
    assert all(result["steps"] == STEPS and result["withdrawn"] == 0 for result in got)


def test_a_slow_passive_holds_up_only_the_actives_that_drew_it(job: Path) -> None:
    """Rank 3 (passive) holds after its step 2: rank 1, which no worker waits for except its own actives, which
    never wait for rank 3 while paired with rank 1, gets past batch AHEAD; an active that drew rank 3 waits for its
    next step boundary (``passive_step``), nobody else."""
    got = results(job, "slow_passive")
    assert min(got[3]["ahead_seen"]) > AHEAD, got[3]["ahead_seen"]
    for record in records(got):
        if record[2] == 3 and record[1] >= 3:
            assert record[3] >= 3, record  # taken after the hold, at the slow worker's step boundary


@pytest.mark.parametrize("name", ["slow_active", "slow_passive", "meetings"])
def test_update_rule_matches_a_replay_of_the_recorded_pairs(job: Path, name: str) -> None:
    """Each worker's weights equal Algorithm 1 replayed in one process with the recorded averages: the gradient at
    x̂ (before the average), the atomic pairwise averages in each passive's order, then the local step."""
    got = results(job, name)
    recorded = records(got)
    check_partners(recorded)
    if name == "meetings":  # passives served between their steps at a validation, not only at the end
        assert any(r[5] and r[3] < STEPS for r in recorded), recorded
    workers, _ = sim.adpsgd_replay(WORLD, STEPS, recorded)
    final_sync = name == "meetings"
    average = sim.average_state(workers)
    for rank, result in enumerate(got):
        assert_close(result["state"], average if final_sync else workers[rank].state(), f"{name}: rank {rank}")
        taken = sum(1 for r in recorded if rank in (r[0], r[2]))
        all_reduces = len(result["val"]) + 1 if final_sync else 0  # the workers' average: validations, final sync
        assert result["comm"]["bytes"] == (taken + all_reduces) * FLOAT_BYTES
    if final_sync:
        assert_close({k.removeprefix("net."): v for k, v in got[0]["reference_after_fit"].items()}, average, "ref")


def test_validation_sees_the_workers_average_after_the_meeting(job: Path) -> None:
    """At a validation (a meeting point) the passives first serve what is pending, then every rank evaluates the
    workers' average: the replay up to step VAL_EVERY with the averages asked for up to there."""
    got = results(job, "meetings")
    recorded = [r for r in records(got) if r[1] <= VAL_EVERY]
    workers, _ = sim.adpsgd_replay(WORLD, VAL_EVERY, recorded)
    expected = sim.val_loss(sim.average_state(workers), WORLD)
    for result in got:
        assert result["val"][0] == pytest.approx(expected, rel=1e-5)


def test_checkpoint_and_resume_continue_the_replay_and_the_draws(job: Path) -> None:
    pair = results(job, "resume")
    first, resumed = [p["uninterrupted"] for p in pair], [p["resumed"] for p in pair]
    before = [r for r in records(first) if r[1] <= STEPS_PER_EPOCH]  # saved after the epoch's meeting
    workers, buffers = sim.adpsgd_replay(WORLD, STEPS_PER_EPOCH, before)
    path = job / "resume" / "a" / "epoch=0.ckpt"
    for rank in range(WORLD):
        shard = torch.load(Path(f"{path}.shards") / f"rank_{rank:05d}.pt", weights_only=True)
        assert shard["strategy_state"]["steps"] == STEPS_PER_EPOCH
        own = {k.removeprefix("net."): v for k, v in shard["state_dict"].items()}
        assert_close(own, workers[rank].state(), f"shard {rank}")
    after = records(resumed)
    check_partners(after, first_step=STEPS_PER_EPOCH + 1)  # the resumed actives continue their streams of draws
    total = 3 * STEPS_PER_EPOCH
    workers, _ = sim.adpsgd_replay(WORLD, total, after, workers=workers, buffers=buffers, done=STEPS_PER_EPOCH)
    for rank, result in enumerate(resumed):
        assert result["steps"] == total
        assert_close(result["state"], workers[rank].state(), f"resumed rank {rank}")


# ----------------------------------------------------------------------------------------------------------------
# In-process: the draws and the settings
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("world_size", "topology"), [(4, "ring"), (6, "ring"), (5, "complete")])
def test_partner_draws_are_seeded_uniform_and_resumable(world_size: int, topology: str) -> None:
    for active in range(0, world_size, 2):
        neighbours = passive_neighbours(active, world_size, topology)
        stream, again = PartnerDraws(7, active, neighbours), PartnerDraws(7, active, neighbours)
        sequence = [stream.draw() for _ in range(400)]
        assert sequence == [again.draw() for _ in range(400)] and set(sequence) == set(neighbours)
        for passive in neighbours:  # uniform: each neighbour within 5 standard deviations of 400 / n
            n = len(neighbours)
            assert abs(sequence.count(passive) - 400 / n) < 5 * (400 * (1 / n) * (1 - 1 / n)) ** 0.5
        resumed = PartnerDraws(7, active, neighbours, done=150)
        assert [resumed.draw() for _ in range(250)] == sequence[150:]
        other = PartnerDraws(8, active, neighbours)
        assert sequence != [other.draw() for _ in range(400)]


def test_an_unknown_schedule_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="AD-PSGD schedule must be 'asynchronous' .* or 'lockstep' .*, got 'sync'"):
        ADPSGDStrategy(schedule="sync")
