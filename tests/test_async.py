"""Asynchronous LSGD, asynchronous EASGD and DOWNPOUR on 4 gloo workers, checked against a replay.

One job runs the scenarios of ``tests/async_scenarios.py`` (rank 1 sleeps after each step, so the board's
transactions interleave out of lockstep); each test compares the saved results with ``tests/async_simulation.py``,
which replays the recorded order of transactions on simulated workers with the same model, shards and seed.
A second, short job kills a worker to check that the others give up instead of hanging.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from lsgd_lightning import AsyncEASGDStrategy, AsyncLSGDStrategy, DownpourStrategy
from tests import async_simulation as asim
from tests.async_scenarios import (
    DOWNPOUR,
    EASGD_ASYNC,
    LSGD_ASYNC,
    run_async_scenarios,
    run_foreign_agent,
    run_killed,
)
from tests.multiproc import rank_results, run_workers, scenario_job
from tests.scenarios import STEPS
from tests.test_distributed import assert_states_close

WORLD = 4
KINDS = ["lsgd_async", "easgd_async", "downpour"]
SETTINGS = {"lsgd_async": LSGD_ASYNC, "easgd_async": EASGD_ASYNC, "downpour": DOWNPOUR}
SCENARIOS = [
    *KINDS,
    *(f"{k}_store" for k in KINDS),
    *(f"{k}_diverge" for k in KINDS),
    *(f"{k}_eval" for k in KINDS),
    *(f"{k}_resume" for k in KINDS),
    "lsgd_async_crash",
]
STEPS_PER_EPOCH = 6  # 96 samples, batch 4, 4 workers


job = scenario_job("async", run_async_scenarios, WORLD, SCENARIOS, timeout_s=420)


def results(job: Path, name: str) -> list[dict[str, Any]]:
    return rank_results(job, name, WORLD)


def finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


# ----------------------------------------------------------------------------------------------------------------
# The update rules, in the order the board saw them
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["rpc", "store"])
@pytest.mark.parametrize("kind", KINDS)
def test_async_update_rule_matches_the_replay(job: Path, kind: str, transport: str) -> None:
    got = results(job, kind if transport == "rpc" else f"{kind}_store")
    order = asim.transactions(got)
    # every round of every worker ran as one transaction: 4 rounds each (steps 3, 6, 9, 12), numbers 1..16
    assert [t for t, _, _ in order] == list(range(1, 4 * WORLD + 1))
    assert all([s for _, r, s in order if r == rank] == [3, 6, 9, 12] for rank in range(WORLD))
    workers, board = asim.replay(kind, order, SETTINGS[kind], WORLD, STEPS)
    for rank, result in enumerate(got):
        assert result["steps"] == STEPS
        assert_states_close(result["state"], workers[rank].net.state_dict(), f"{kind} rank {rank}")
    if kind == "lsgd_async":
        # the leader each worker saw after its round is the replay's board leader after that transaction
        seen = {t: r["lsgd/leader"] for res in got for r in res["rounds"] for t in [int(r["async/transaction"])]}
        assert [seen[t] for t in sorted(seen)] == board.leaders_seen


@pytest.mark.parametrize("kind", KINDS)
def test_the_weights_travel_by_rpc_unless_the_store_is_asked_for(job: Path, kind: str) -> None:
    """weight_transport="rpc" (default): the board's store holds no weight entry; "store": it does."""
    for result in results(job, kind):
        assert (result["holder"], result["weights_on_store"]) == ("RpcHolder", False)
    for result in results(job, f"{kind}_store"):
        assert (result["holder"], result["weights_on_store"]) == ("StoreHolder", True)


@pytest.mark.parametrize("kind", KINDS)
def test_workers_do_not_wait_for_the_straggler(job: Path, kind: str) -> None:
    """Rank 1 sleeps 50 ms after each step: a fast worker runs a later round before the straggler's earlier one,
    which lockstep rounds (and Lightning's per-step SIGTERM broadcast, replaced by these strategies) would forbid."""
    order = asim.transactions(results(job, kind))
    position = {(rank, step): i for i, (_, rank, step) in enumerate(order)}
    straggler_first = position[(1, 3)]
    assert any(position[(rank, 6)] < straggler_first for rank in (0, 2, 3)), order


def test_lsgd_async_leader_never_pulls_and_others_do(job: Path) -> None:
    for rank, result in enumerate(results(job, "lsgd_async")):
        for r in result["rounds"]:
            if r["lsgd/leader"] == rank:
                assert r["lsgd/dist_to_leader"] == 0.0
            assert math.isfinite(r["lsgd/leader_score"])


@pytest.mark.parametrize("kind", KINDS)
def test_a_diverged_worker_is_reset_and_the_board_stays_finite(job: Path, kind: str) -> None:
    """Rank 2's weights turn NaN before step 4; at its next round it takes the board's model with fresh optimizer
    state, never publishes, and the board (leader copy, center, parameters) stays finite."""
    got = results(job, f"{kind}_diverge")
    workers, board = asim.replay(kind, asim.transactions(got), SETTINGS[kind], WORLD, STEPS, poison=(2, 4))
    assert finite(board.state)
    for rank, result in enumerate(got):
        assert_states_close(result["state"], workers[rank].net.state_dict(), f"{kind} rank {rank}")
        assert finite(result["state"])
        assert result["rounds"][-1]["health/resets"] == (1 if rank == 2 else 0)
        if kind == "lsgd_async":  # a NaN score never reaches the board (a diverged leader resigns with +inf)
            assert all(not math.isnan(r["lsgd/leader_score"]) for r in result["rounds"])


@pytest.mark.parametrize("kind", KINDS)
def test_evaluation_and_final_sync_see_the_boards_model(job: Path, kind: str) -> None:
    """Validation (every 3 steps, sync_dist logging) meets on the board; at the end every rank holds the board's
    model (final_sync), identical on all ranks, and equal to the replay's."""
    got = results(job, f"{kind}_eval")
    _, board = asim.replay(kind, asim.transactions(got), SETTINGS[kind], WORLD, STEPS)
    for rank, result in enumerate(got):
        assert len(result["val"]) == STEPS // 3
        for key, value in board.state.items():
            torch.testing.assert_close(result["state"][key], value, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {key}")
            assert torch.equal(result["reference_after_fit"][f"net.{key}"], got[0]["reference_after_fit"][f"net.{key}"])
        assert result["val"] == got[0]["val"]  # every rank validated the same model


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: consistent when saved, and a resume continues as the replay says
# ----------------------------------------------------------------------------------------------------------------
def _state_at_checkpoint(kind: str, pair: list[dict[str, Any]]) -> tuple[list[Any], asim.Board, list[Any]]:
    first = [p["uninterrupted"] for p in pair]
    order = asim.transactions(first)
    settings = {**SETTINGS[kind], "tau": 4}
    before = [t for t in order if t[2] <= STEPS_PER_EPOCH]
    workers, board = asim.replay(kind, before, settings, WORLD, STEPS_PER_EPOCH, end=False)
    return workers, board, order


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_holds_every_worker_at_the_same_step_and_the_boards_model(job: Path, kind: str) -> None:
    pair = results(job, f"{kind}_resume")
    workers, board, _ = _state_at_checkpoint(kind, pair)
    path = job / f"{kind}_resume" / "a" / "epoch=0.ckpt"
    main = torch.load(path, weights_only=True)
    for rank in range(WORLD):
        shard = torch.load(Path(f"{path}.shards") / f"rank_{rank:05d}.pt", weights_only=True)
        assert shard["strategy_state"]["steps"] == STEPS_PER_EPOCH
        own = {k.removeprefix("net."): v for k, v in shard["state_dict"].items()}
        assert_states_close(own, workers[rank].net.state_dict(), f"{kind} shard {rank}")
    for key, value in board.state.items():
        torch.testing.assert_close(main["state_dict"][f"net.{key}"], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("kind", KINDS)
def test_resume_continues_from_the_checkpoint_as_the_replay_says(job: Path, kind: str) -> None:
    pair = results(job, f"{kind}_resume")
    workers, board, _ = _state_at_checkpoint(kind, pair)
    resumed = [p["resumed"] for p in pair]
    total = 3 * STEPS_PER_EPOCH
    settings = {**SETTINGS[kind], "tau": 4}
    workers, board = asim.replay(kind, asim.transactions(resumed), settings, WORLD, total, workers, board)
    for rank, result in enumerate(resumed):
        assert result["steps"] == total
        assert all(r["step"] > STEPS_PER_EPOCH for r in result["rounds"])
        assert_states_close(result["state"], workers[rank].net.state_dict(), f"{kind} resumed rank {rank}")


# ----------------------------------------------------------------------------------------------------------------
# Failures: nobody hangs
# ----------------------------------------------------------------------------------------------------------------
def test_a_worker_that_raises_stops_the_others_with_its_name(job: Path) -> None:
    for rank, result in enumerate(results(job, "lsgd_async_crash")):
        error = result["error"]
        assert error is not None
        if rank == 2:
            assert "injected failure on rank 2" in error
        else:
            assert "rank 2 failed" in error and "injected failure on rank 2" in error, error
        assert result["seconds"] < 25  # well before the 30 s timeout: the failure is seen, not waited out


def test_a_worker_that_vanishes_is_named_after_the_timeout(tmp_path: Path) -> None:
    run_workers(run_killed, 2, (str(tmp_path),), errdir=tmp_path / "errors", timeout_s=120)  # 2 start faster
    result = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert result["error"] is not None and "rank(s) [1]" in result["error"], result["error"]
    assert "took no optimizer step for 4 s" in result["error"]
    assert result["seconds"] < 20  # the 4 s without progress, not the process group's timeout
    assert not (tmp_path / "rank1.pt").exists()


def test_a_worker_with_an_rpc_agent_of_its_own_fails_and_is_named_by_the_others(tmp_path: Path) -> None:
    run_workers(run_foreign_agent, 2, (str(tmp_path),), errdir=tmp_path / "errors", timeout_s=120)
    own, other = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (1, 0))
    assert own["error"] is not None and "an RPC agent started outside lsgd_lightning" in own["error"], own
    assert other["error"] is not None and "rank 1 failed" in other["error"], other
    assert "an RPC agent started outside lsgd_lightning" in other["error"]
    assert other["seconds"] < 30  # seen at the meeting point, not waited out in init_rpc (no timeout there)


# ----------------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: AsyncLSGDStrategy(pull_strength=1.5), "pull_strength must be a number in [0, 1]"),
        (lambda: AsyncLSGDStrategy(tau=0), "tau must be an integer >= 1"),
        (lambda: AsyncLSGDStrategy(leader_window=0), "leader_window must be an integer >= 1"),
        (lambda: AsyncLSGDStrategy(eval_on="center"), "eval_on must be 'leader', 'average' or 'local'"),
        (lambda: AsyncEASGDStrategy(moving_rate=1.0), "moving_rate (alpha) must be a number in (0, 1)"),
        (lambda: AsyncEASGDStrategy(beta=0.0), "beta must be a number in (0, 1]"),
        (lambda: DownpourStrategy(tau=-1), "tau must be an integer >= 1"),
        (lambda: DownpourStrategy(eval_on="leader"), "eval_on must be 'parameters' or 'local'"),
        (lambda: DownpourStrategy(push_every=0), "push_every must be an integer >= 1"),
        (lambda: DownpourStrategy(fetch_every=2.5), "fetch_every must be an integer >= 1"),
        (lambda: DownpourStrategy(push_scale=0.0), "push_scale must be a number in (0, 1] or '1/P'"),
        (lambda: DownpourStrategy(push_scale=1.5), "push_scale must be a number in (0, 1] or '1/P'"),
        (lambda: DownpourStrategy(push_scale="1/2"), "push_scale must be a number in (0, 1] or '1/P'"),
        (lambda: AsyncEASGDStrategy(momentum_rule="sgd"), "momentum_rule must be 'optimizer' or 'eamsgd'"),
        (lambda: DownpourStrategy(weight_transport="tcp"), "weight_transport must be 'rpc' or 'store'"),
        (
            lambda: DownpourStrategy(weight_transport="store", rpc_options={"num_worker_threads": 2}),
            "rpc_options apply to weight_transport='rpc' only",
        ),
        (lambda: AsyncEASGDStrategy(rpc_options={"rpc_timeout": 5}), "rpc_options may not set ['rpc_timeout']"),
    ],
)
def test_bad_settings_are_refused_by_name(make: Any, message: str) -> None:
    """Refused when the strategy is constructed, before any process starts."""
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        make()
