"""EAMSGD (both EASGD strategies, ``momentum_rule="eamsgd"``) and DOWNPOUR with separate push and fetch periods, on
4 gloo workers, against the single-process simulation (``tests/simulation.py``) and the replay of the board's
recorded order (``tests/async_simulation.py``).

Each check can fail on the rule it is about: the EAMSGD simulation is also run with the force on the look-ahead
point (torch's Nesterov SGD, ``momentum_rule="optimizer"``) and the two must differ by far more than the tolerance;
the DOWNPOUR replay is also run with one period and an unscaled push, which must not match either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests import async_scenarios, models
from tests import async_simulation as asim
from tests import scenarios as sync_scenarios
from tests import simulation as sim
from tests.async_scenarios import DOWNPOUR, DOWNPOUR_PUSH_FETCH, EASGD_ASYNC
from tests.multiproc import rank_results, scenario_job
from tests.scenarios import EASGD, STEPS
from tests.test_distributed import assert_states_close

WORLD = 4
SYNC = ["easgd_eamsgd", "easgd_eamsgd_resume"]
ASYNC = ["easgd_async_eamsgd", "downpour_push_fetch"]


def _scenario(name: str, rank: int, world_size: int, out: Path) -> dict[str, Any]:
    module = sync_scenarios if name in SYNC else async_scenarios
    return module.scenario(name, rank, world_size, out)


def run_fidelity_scenarios(rank: int, world_size: int, out: str, names: list[str]) -> None:
    sync_scenarios.run_scenarios(rank, world_size, out, names, run=_scenario)


job = scenario_job("fidelity", run_fidelity_scenarios, WORLD, SYNC + ASYNC, timeout_s=400)


def results(job: Path, name: str) -> list[dict[str, Any]]:
    return rank_results(job, name, WORLD)


def far_apart(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    """Whether two simulations' first-layer weights differ by far more than the comparison's tolerance."""
    return any(float((x["body.0.weight"] - y["body.0.weight"]).abs().max()) > 1e-3 for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------------------------
# EAMSGD (Zhang et al. 2015, Sec. 3.2 eq. 7 and Algorithm 2)
# ----------------------------------------------------------------------------------------------------------------
def simulate_easgd(eamsgd: bool) -> list[sim.Worker]:
    """Synchronous EASGD on Nesterov SGD's settings: EAMSGD (force on x), or torch's Nesterov step (force on the
    look-ahead point the net holds)."""
    workers = sim.make_workers(WORLD)
    if eamsgd:
        sim.use_eamsgd(workers)
    else:
        for worker in workers:
            worker.optimizer = models.make_optimizer(worker.net.parameters(), nesterov=True)
    center = {k: v.clone() for k, v in workers[0].float_state().items()}
    for step in range(1, STEPS + 1):
        for worker in workers:
            sim.local_step(worker)
        if step % EASGD["tau"] == 0:
            sim.easgd_round(workers, center, EASGD["beta"] / WORLD)
    return workers


def test_eamsgd_matches_the_simulation_of_eq_7(job: Path) -> None:
    got = results(job, "easgd_eamsgd")
    workers = simulate_easgd(eamsgd=True)
    for rank, result in enumerate(got):
        assert result["comm"]["rounds"] == STEPS // EASGD["tau"]
        assert result["optimizer"]["state"] == {}  # SGD's own step never ran: the strategy stepped the momentum
        # the model holds the look-ahead x + δv, where the next gradient would be taken
        assert_states_close(result["state"], workers[rank].net.state_dict(), f"rank {rank} final weights")
    other = simulate_easgd(eamsgd=False)
    assert far_apart(sim.states(workers), sim.states(other)), "the test could not tell where the force acts"


def test_eamsgd_resumes_bitwise_exact_with_its_x_and_velocity(job: Path) -> None:
    pairs = results(job, "easgd_eamsgd_resume")
    for rank, pair in enumerate(pairs):
        a, b = pair["uninterrupted"], pair["resumed"]
        assert a["global_step"] == b["global_step"] > 0 and a["steps"] == b["steps"]
        for key in a["state"]:
            assert torch.equal(a["state"][key], b["state"][key]), f"rank {rank}: {key}"
        assert a["comm"]["rounds"] == b["comm"]["rounds"]


def test_asynchronous_eamsgd_matches_the_replay_of_algorithm_2(job: Path) -> None:
    got = results(job, "easgd_async_eamsgd")
    order = asim.transactions(got)
    assert all([s for _, r, s in order if r == rank] == [3, 6, 9, 12] for rank in range(WORLD))
    workers = sim.make_workers(WORLD)
    sim.use_eamsgd(workers)
    workers, _ = asim.replay("easgd_async", order, EASGD_ASYNC, WORLD, STEPS, workers=workers)
    for rank, result in enumerate(got):
        assert result["steps"] == STEPS and result["optimizer"]["state"] == {}
        assert_states_close(result["state"], workers[rank].net.state_dict(), f"rank {rank}")
    nesterov = sim.make_workers(WORLD)
    for worker in nesterov:
        worker.optimizer = models.make_optimizer(worker.net.parameters(), nesterov=True)
    nesterov, _ = asim.replay("easgd_async", order, EASGD_ASYNC, WORLD, STEPS, workers=nesterov)
    assert far_apart(sim.states(workers), sim.states(nesterov)), "the test could not tell where the force acts"


# ----------------------------------------------------------------------------------------------------------------
# DOWNPOUR with n_push and n_fetch (Dean et al. 2012, Algorithm 7.1)
# ----------------------------------------------------------------------------------------------------------------
def test_downpour_push_and_fetch_periods_match_the_replay(job: Path) -> None:
    got = results(job, "downpour_push_fetch")
    order = asim.transactions(got)
    # a round (one transaction) after every step that is a multiple of push_every = 2 or of fetch_every = 3
    assert [t for t, _, _ in order] == list(range(1, 9 * WORLD + 1))
    assert all([s for _, r, s in order if r == rank] == [2, 3, 4, 6, 8, 9, 10, 12, 14] for rank in range(WORLD))
    settings = {**DOWNPOUR, **DOWNPOUR_PUSH_FETCH}
    workers, _ = asim.replay("downpour", order, settings, WORLD, STEPS)
    for rank, result in enumerate(got):
        assert result["steps"] == STEPS
        assert_states_close(result["state"], workers[rank].net.state_dict(), f"rank {rank}")
        pushes = [r for r in result["rounds"] if "downpour/update_norm" in r]
        assert [int(r["step"]) for r in pushes] == [2, 4, 6, 8, 10, 12, 14]
    unscaled, _ = asim.replay("downpour", order, {**settings, "push_scale": 1.0}, WORLD, STEPS)
    assert far_apart(sim.states(workers), sim.states(unscaled)), "the test could not tell the push scale"
    one_period, _ = asim.replay("downpour", order, {"tau": 2, "push_scale": "1/P"}, WORLD, STEPS)
    assert far_apart(sim.states(workers), sim.states(one_period)), "the test could not tell the fetch period"
