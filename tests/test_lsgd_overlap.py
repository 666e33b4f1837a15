"""Leader SGD's ``overlap_steps`` and ``leader_broadcast="chain"`` options (4 gloo workers on CPU).

One job runs the scenarios of ``tests/overlap_scenarios.py`` in 4 spawned workers; the tests compare the saved
results with a single-process replay of the same workers, data shards and seed: for the overlapped rounds the leader
is elected after step t from the scores then, its weights are copied at t, and after step t+k (or when fit ends,
whichever comes first) every other worker moves toward that copy: x <- x - λ (x - x_leader(t)).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from lsgd_lightning import LSGDStrategy
from tests import simulation as sim
from tests.multiproc import run_workers
from tests.overlap_scenarios import FAIL_STEP, OVERLAP, OVERLAP_END, run_overlap_scenarios
from tests.scenarios import LSGD, STEPS, VAL_EVERY
from tests.test_distributed import WORLD, assert_states_close, results, simulate_lsgd

SCENARIOS = [
    "overlap_exception",  # first: every later scenario then also shows that nothing was left hanging
    "tree",
    "chain",
    "overlap",
    "overlap_val",
    "overlap_final_sync",
    "overlap_manual_nan",
    "overlap_resume",
]
#: What one round moves per rank: the leader's parameters and buffers (float32 and the int64 counter), P scores.
ROUND_BYTES = sum(v.numel() * v.element_size() for v in sim.initial_net().state_dict().values()) + 4 * WORLD


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("overlap")
    run_workers(run_overlap_scenarios, WORLD, (str(out), SCENARIOS), errdir=out / "errors", timeout_s=300)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The reference: the delayed pull replayed in one process
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def pull_toward_snapshot(workers: list[sim.Worker], pending: dict[str, Any]) -> list[float]:
    """Non-leaders: x <- x - λ (x - snapshot), integer buffers copied; workers whose score was NaN take the
    snapshot. Returns each worker's distance to the snapshot (0 for the leader, NaN for a reset worker)."""
    distances = []
    for rank, worker in enumerate(workers):
        if pending["reset"][rank]:
            worker.reset_to(pending["snapshot"])
            distances.append(math.nan)
        elif rank == pending["leader"]:
            distances.append(0.0)
        else:
            state = worker.net.state_dict()
            floats = [k for k, v in state.items() if v.is_floating_point()]
            distances.append(
                math.sqrt(sum(float((state[k] - pending["snapshot"][k]).double().square().sum()) for k in floats))
            )
            for key, value in state.items():
                target = pending["snapshot"][key]
                value.copy_(value - LSGD["pull_strength"] * (value - target) if key in floats else target)
    return distances


def simulate_overlap(
    tau: int, k: int, nan_ranks: tuple[int, ...] = (), val_every: int | None = None
) -> tuple[list[sim.Worker], list[dict[str, Any]], list[dict[str, Any]], list[float]]:
    """Workers after STEPS steps (a pull still pending at the end applied then), round starts, pulls, val losses."""
    workers = sim.make_workers(WORLD)
    window = LSGD["leader_window"]
    starts: list[dict[str, Any]] = []
    pulls: list[dict[str, Any]] = []
    vals: list[float] = []
    pending: dict[str, Any] | None = None
    for step in range(1, STEPS + 1):
        for rank, worker in enumerate(workers):
            sim.local_step(worker, nan_report=rank in nan_ranks)
        if pending is not None and step == pending["due"]:
            pulls.append({"step": step, "distances": pull_toward_snapshot(workers, pending)})
            pending = None
        if step % tau == 0:
            leader, scores = sim.elect(workers, window)
            assert leader is not None
            snapshot = {key: value.clone() for key, value in workers[leader].net.state_dict().items()}
            pending = {
                "due": step + k,
                "leader": leader,
                "snapshot": snapshot,
                "reset": [math.isnan(s) for s in scores],
            }
            starts.append({"step": step, "leader": leader, "leader_score": scores[leader], "snapshot": snapshot})
        if val_every and step % val_every == 0:
            leader, _ = sim.elect(workers, window)
            vals.append(sim.val_loss(workers[leader].net.state_dict(), WORLD))
    if pending is not None:  # fit ends inside the round: its pull lands then
        pulls.append({"step": STEPS, "distances": pull_toward_snapshot(workers, pending)})
    return workers, starts, pulls, vals


def logged_pulls(result: dict[str, Any]) -> list[dict[str, float]]:
    """The per-step records of the steps at which a pull landed (a round was in flight before, not after)."""
    records = result["per_step"]
    return [now for before, now in zip(records, records[1:]) if before["in_flight"] and not now["in_flight"]]


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"overlap_steps": -1}, "overlap_steps"),
        ({"overlap_steps": 1.5}, "overlap_steps"),
        ({"overlap_steps": True}, "overlap_steps"),
        ({"overlap_steps": "2"}, "overlap_steps"),
        ({"tau": 4, "overlap_steps": 4}, "overlap_steps \\(4\\) must be smaller than tau \\(4\\)"),
        ({"leader_broadcast": "ring"}, "leader_broadcast"),
        ({"leader_broadcast": None}, "leader_broadcast"),
        ({"group_size": 2, "overlap_steps": 1}, "overlap_steps=1 .* need group_size=None"),
        ({"group_size": "node", "leader_broadcast": "chain"}, "leader_broadcast='chain' need group_size=None"),
        (
            {"tau": 4, "overlap_steps": 1, "leader_broadcast": "chain"},
            "overlap_steps > 0 needs leader_broadcast='tree'",
        ),
    ],
)
def test_bad_overlap_and_broadcast_arguments_are_refused(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        LSGDStrategy(**kwargs)


def test_defaults_are_blocking_tree_rounds() -> None:
    strategy = LSGDStrategy()
    assert (strategy.overlap_steps, strategy.leader_broadcast, strategy.round_in_flight) == (0, "tree", False)
    strategy.finish_transfer()  # nothing in flight: a no-op


# ----------------------------------------------------------------------------------------------------------------
# Chain broadcast
# ----------------------------------------------------------------------------------------------------------------
def test_chain_broadcast_gives_the_tree_result_bit_for_bit_with_the_same_byte_count(job: Path) -> None:
    workers, rounds, _ = simulate_lsgd()
    for rank, (tree, chain) in enumerate(zip(results(job, "tree"), results(job, "chain"))):
        for key, value in tree["state"].items():
            assert torch.equal(chain["state"][key], value), f"rank {rank}: {key}"
        assert_states_close(chain["state"], workers[rank].net.state_dict(), f"rank {rank} (chain)")
        assert [int(r["lsgd/leader"]) for r in chain["rounds"]] == [r["leader"] for r in rounds]
        # each rank counts the leader's buffers once (sent or received into) plus the P scores, per round
        assert chain["comm"]["rounds"] == len(rounds) == STEPS // LSGD["tau"]
        assert chain["comm"]["bytes"] == tree["comm"]["bytes"] == len(rounds) * ROUND_BYTES
        assert [r["comm/bytes"] for r in chain["rounds"]] == [n * ROUND_BYTES for n in range(1, len(rounds) + 1)]


# ----------------------------------------------------------------------------------------------------------------
# Overlapped rounds
# ----------------------------------------------------------------------------------------------------------------
def test_overlapped_pull_toward_the_stale_leader_matches_simulation(job: Path) -> None:
    tau, k = OVERLAP["tau"], OVERLAP["overlap_steps"]
    workers, starts, pulls, _ = simulate_overlap(tau, k)
    blocking, _, _ = simulate_lsgd(tau=tau)
    assert not torch.allclose(workers[1].net.body[0].weight, blocking[1].net.body[0].weight, atol=1e-4), (
        "the fixture must tell the delayed pull from the blocking one"
    )
    assert [p["step"] for p in pulls] == [s["step"] + k for s in starts] == [5, 8, 11, 14]
    assert len({s["leader"] for s in starts}) > 1, "the fixture should make the leader change"
    for rank, result in enumerate(results(job, "overlap")):
        assert_states_close(result["state"], workers[rank].net.state_dict(), f"rank {rank} final weights")
        # a round is counted and logged when it starts (leader, score, bytes), its pull k steps later
        assert [r["step"] for r in result["rounds"]] == [s["step"] for s in starts]
        assert [int(r["lsgd/leader"]) for r in result["rounds"]] == [s["leader"] for s in starts]
        for logged, expected in zip(result["rounds"], starts):
            assert logged["lsgd/leader_score"] == pytest.approx(expected["leader_score"], rel=1e-5)
            assert "lsgd/dist_to_leader" not in logged
        landed = logged_pulls(result)
        assert [p["step"] for p in landed] == [p["step"] for p in pulls]
        for logged, expected in zip(landed, pulls):
            assert logged["lsgd/dist_to_leader"] == pytest.approx(expected["distances"][rank], rel=1e-4, abs=1e-6)
        assert result["comm"]["rounds"] == len(starts)
        assert result["comm"]["bytes"] == len(starts) * ROUND_BYTES
        assert not result["in_flight_after"]


def test_evaluation_waits_for_the_transfer_and_end_of_fit_lands_the_last_pull(job: Path) -> None:
    """Validation of the leader every 3 steps, three times with a round in flight: it waits for the transfer
    (never applies the pull early), sees the current leader, and training is the simulation's without validation.
    Fit ends (step 14) inside the round of step 12: its pull is applied then."""
    tau, k = OVERLAP_END["tau"], OVERLAP_END["overlap_steps"]
    workers, starts, pulls, vals = simulate_overlap(tau, k, val_every=VAL_EVERY)
    assert [p["step"] for p in pulls] == [7, 11, STEPS]
    for rank, result in enumerate(results(job, "overlap_val")):
        assert_states_close(result["state"], workers[rank].net.state_dict(), f"rank {rank} final weights")
        assert result["val"] == pytest.approx(vals, rel=1e-5)
        checks = result["validations"]
        assert [c["step"] for c in checks] == [3, 6, 9, 12]
        assert [c["in_flight"] for c in checks] == [0.0, 1.0, 1.0, 1.0]
        assert not any(c["running"] for c in checks), "validation ran beside a transfer"
        assert not result["in_flight_after"]
        # exact bytes: every round and every evaluation is one election (P scores) and one copy of the leader
        assert result["comm"]["rounds"] == len(starts) == 3
        assert result["comm"]["bytes"] == (len(starts) + len(vals)) * ROUND_BYTES


def test_final_sync_follows_the_last_pull(job: Path) -> None:
    workers, _, _, _ = simulate_overlap(OVERLAP_END["tau"], OVERLAP_END["overlap_steps"])
    leader, _ = sim.elect(workers, LSGD["leader_window"])
    for rank, result in enumerate(results(job, "overlap_final_sync")):
        assert_states_close(result["state"], workers[leader].net.state_dict(), f"rank {rank} after final sync")


def test_overlapped_rounds_in_manual_optimization_reset_a_nan_scored_worker_to_the_snapshot(job: Path) -> None:
    workers, starts, pulls, _ = simulate_overlap(OVERLAP["tau"], OVERLAP["overlap_steps"], nan_ranks=(1,))
    assert all(s["leader"] != 1 for s in starts)
    for rank, result in enumerate(results(job, "overlap_manual_nan")):
        assert_states_close(result["state"], workers[rank].net.state_dict(), f"rank {rank} (manual optimization)")
        assert [int(r["lsgd/leader"]) for r in result["rounds"]] == [s["leader"] for s in starts]
        last = logged_pulls(result)[-1]
        assert last["health/resets"] == (len(pulls) if rank == 1 else 0)
        assert ("lsgd/dist_to_leader" in last) == (rank != 1)  # a reset worker was not pulled


def test_resume_with_a_round_in_flight_is_bitwise_exact(job: Path) -> None:
    """The epoch-0 checkpoint (step 6) falls inside the round of step 4 (pull due after step 7): each shard holds the
    received snapshot and the due step, and the resumed run lands the pull exactly where the uninterrupted one did."""
    pairs = results(job, "overlap_resume")
    path = job / "overlap_resume" / "ckpt_a" / "epoch=0.ckpt"
    saved = [
        torch.load(Path(f"{path}.shards") / f"rank_{r:05d}.pt", weights_only=True)["strategy_state"]["extra"]
        for r in range(WORLD)
    ]
    for rank, extra in enumerate(saved):
        assert extra["in_flight"]["due"] == 7 and extra["in_flight"]["reset"] is False, f"rank {rank}"
        assert extra["in_flight"]["leader"] == saved[0]["in_flight"]["leader"]
        for flat, first in zip(extra["in_flight"]["flats"], saved[0]["in_flight"]["flats"]):
            assert torch.equal(flat, first), f"rank {rank}: the snapshot had not fully arrived"
    for rank, pair in enumerate(pairs):
        a, b = pair["uninterrupted"], pair["resumed"]
        assert a["global_step"] == b["global_step"] == 18
        for key in a["state"]:
            assert torch.equal(a["state"][key], b["state"][key]), f"rank {rank}: {key}"
        for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
            assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"]), f"rank {rank}: momentum"
        assert a["comm"]["bytes"] == b["comm"]["bytes"] and a["comm"]["rounds"] == b["comm"]["rounds"] == 4


def test_an_exception_during_an_overlapped_round_abandons_it_without_hanging(job: Path) -> None:
    for rank, result in enumerate(results(job, "overlap_exception")):
        # its own error, or (when another rank raised first) the first error, named with its rank
        assert result["error"].endswith(f"boom after step {FAIL_STEP}"), f"rank {rank}: {result['error']}"
        assert not result["in_flight_after"]
    # the scenarios after it ran on the same process group (the job would have timed out otherwise)
    assert all(r["global_step"] == STEPS for r in results(job, "overlap"))
