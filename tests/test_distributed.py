"""Multi-process tests (4 gloo workers on CPU): every strategy checked against the reference simulation.

One job runs every scenario of ``tests/scenarios.py`` in 4 spawned worker processes (module scope, so the
interpreter start-up is paid once); each test then compares that job's saved results with
``tests/simulation.py``, which replays the same workers, data shards and seed in a single process.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import models
from tests import simulation as sim
from tests.multiproc import rank_results, scenario_job
from tests.scenarios import EASGD, LSGD, MULTI, STEPS, VAL_EVERY, run_scenarios

WORLD = 4
SCENARIOS = [
    "lsgd",
    "lsgd_eval_leader",
    "lsgd_eval_local",
    "lsgd_final_sync",
    "lsgd_manual_nan_rank1",
    "lsgd_manual_all_nan",
    "lsgd_diverge",
    "lsgd_multi_diverge",
    "easgd_diverge",
    "dataparallel_diverge",
    "lsgd_repeat",
    "lsgd_fit_then_test",
    "uneven_iterable",
    "lsgd_accumulate",
    "lsgd_resume",
    "lsgd_missing_shard",
    "lsgd_resume_other_world",
    "lsgd_multi_resume",
    "dataparallel_resume",
    "lsgd_multi",
    "easgd",
    "easgd_eval_center",
    "easgd_final_sync",
    "easgd_resume",
    "dataparallel",
    "ddp",
    "bytes_lsgd",
    "bytes_easgd",
    "bytes_dataparallel",
]
RTOL, ATOL = 1e-5, 1e-6


job = scenario_job("dist", run_scenarios, WORLD, SCENARIOS, timeout_s=400)


def results(job: Path, name: str) -> list[dict[str, Any]]:
    return rank_results(job, name, WORLD)


def assert_states_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for key in expected:
        if expected[key].is_floating_point():
            torch.testing.assert_close(actual[key], expected[key], rtol=RTOL, atol=ATOL, msg=f"{what}: {key}")
        else:
            assert torch.equal(actual[key], expected[key]), f"{what}: {key}"


def assert_each_rank_validated(got: list[dict[str, Any]], vals: list[float], workers: list[sim.Worker]) -> None:
    """Every rank logged the simulation's validation losses ``vals`` and still holds its own simulated weights."""
    for rank, result in enumerate(got):
        assert result["val"] == pytest.approx(vals, rel=1e-5)
        assert_states_close(result["state"], workers[rank].net.state_dict(), f"rank {rank} after validations")


def assert_tested_after_fit(got: list[dict[str, Any]], expected_loss: float, workers: list[sim.Worker]) -> None:
    """``trainer.test`` after fit scored ``expected_loss`` on every rank and left each rank its own fitted weights."""
    for rank, result in enumerate(got):
        assert result["test_loss"] == pytest.approx(expected_loss, rel=1e-5)
        assert_states_close(result["after_fit"], workers[rank].net.state_dict(), f"rank {rank} after fit")
        for key, value in result["after_fit"].items():
            assert torch.equal(result["after_test"][key], value), f"rank {rank}: {key} changed by trainer.test"


def simulate_lsgd(
    steps: int = STEPS,
    tau: int = LSGD["tau"],
    nan_ranks: tuple[int, ...] = (),
    micro_batches: int = 1,
    val_every: int | None = None,
    eval_on: str = "leader",
    poison: tuple[int, int] | None = None,
) -> tuple[list[sim.Worker], list[dict[str, Any]], list[float]]:
    workers = sim.make_workers(WORLD)
    rounds, vals = [], []
    for step in range(1, steps + 1):
        for rank, worker in enumerate(workers):
            poisoned = poison == (rank, step - 1)
            sim.local_step(worker, nan_report=rank in nan_ranks, micro_batches=micro_batches, poison=poisoned)
        if step % tau == 0:
            outcome = sim.lsgd_round(workers, LSGD["pull_strength"], LSGD["leader_window"])
            if outcome is not None:
                rounds.append({"step": step, **outcome})
        if val_every and step % val_every == 0:
            if eval_on == "leader":
                leader, _ = sim.elect(workers, LSGD["leader_window"])
                vals.append(sim.val_loss(workers[leader].net.state_dict(), WORLD))
            else:
                vals.append(
                    sum(sim.val_loss(w.net.state_dict(), WORLD, shard_of=r) for r, w in enumerate(workers)) / WORLD
                )
    return workers, rounds, vals


# ----------------------------------------------------------------------------------------------------------------
# Leader SGD
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lsgd", "easgd"])
def test_workers_start_from_rank_zero_weights(job: Path, name: str) -> None:
    """Each rank built a different model; training starts from rank 0's on every rank."""
    init = sim.initial_net().state_dict()
    for rank, result in enumerate(results(job, name)):
        for key, value in init.items():
            assert torch.equal(result["initial"][f"net.{key}"], value), f"rank {rank}: {key}"


def test_lsgd_update_rule_matches_simulation(job: Path) -> None:
    got = results(job, "lsgd")
    workers, rounds, _ = simulate_lsgd()
    assert len(rounds) == STEPS // LSGD["tau"]
    assert len({r["leader"] for r in rounds}) > 1, "the fixture should make the leader change"
    for rank, result in enumerate(got):
        assert result["steps"] == STEPS
        assert_states_close(result["state"], workers[rank].net.state_dict(), f"rank {rank} final weights")
        assert [r["step"] for r in result["rounds"]] == [r["step"] for r in rounds]
        assert [int(r["lsgd/leader"]) for r in result["rounds"]] == [r["leader"] for r in rounds]
        for logged, expected in zip(result["rounds"], rounds):
            assert logged["lsgd/leader_score"] == pytest.approx(expected["leader_score"], rel=1e-5)
            assert logged["lsgd/dist_to_leader"] == pytest.approx(expected["distances"][rank], rel=1e-4, abs=1e-6)


def test_lsgd_momentum_never_sees_the_pull(job: Path) -> None:
    """The momentum buffers equal those of the simulation, whose pull is outside the optimizer."""
    got = results(job, "lsgd")
    workers, _, _ = simulate_lsgd()
    for rank, result in enumerate(got):
        expected = [s["momentum_buffer"] for s in workers[rank].optimizer.state_dict()["state"].values()]
        actual = [s["momentum_buffer"] for s in result["optimizer"]["state"].values()]
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, rtol=RTOL, atol=ATOL)


def test_lsgd_logs_round_metrics_rank_locally(job: Path) -> None:
    got = results(job, "lsgd")
    # the leader's parameters and all its buffers (float32 and the int64 counter) plus P float32 scores
    model_bytes = sum(v.numel() * v.element_size() for v in sim.initial_net().state_dict().values())
    for result in got:
        last = result["rounds"][-1]
        assert last["comm/rounds"] == len(result["rounds"])
        assert last["comm/bytes"] == len(result["rounds"]) * (model_bytes + 4 * WORLD)
        assert last["comm/seconds"] > 0
    # distances differ per rank: these metrics are not synced
    assert len({round(r["rounds"][-1]["lsgd/dist_to_leader"], 7) for r in got}) > 1
    with open(job / "lsgd" / "csv" / "version_0" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    for key in ("lsgd/leader", "lsgd/leader_score", "lsgd/dist_to_leader", "comm/bytes", "comm/seconds", "comm/rounds"):
        assert any(row.get(key) for row in rows), key


def test_lsgd_eval_on_leader_validates_the_leader_without_disturbing_training(job: Path) -> None:
    got = results(job, "lsgd_eval_leader")
    workers, _, vals = simulate_lsgd(val_every=VAL_EVERY, eval_on="leader")
    assert len(vals) == STEPS // VAL_EVERY
    assert_each_rank_validated(got, vals, workers)


def test_lsgd_eval_on_local_validates_each_rank_on_its_shard(job: Path) -> None:
    got = results(job, "lsgd_eval_local")
    workers, _, vals = simulate_lsgd(val_every=VAL_EVERY, eval_on="local")
    leader_vals = simulate_lsgd(val_every=VAL_EVERY, eval_on="leader")[2]
    assert vals != pytest.approx(leader_vals, rel=1e-3), "fixture must tell the two apart"
    assert_each_rank_validated(got, vals, workers)


def test_lsgd_test_after_fit_sees_the_leader_and_keeps_each_rank_its_weights(job: Path) -> None:
    got = results(job, "lsgd_fit_then_test")
    workers, _, _ = simulate_lsgd()
    leader, _ = sim.elect(workers, LSGD["leader_window"])
    expected = sim.val_loss(workers[leader].net.state_dict(), WORLD)
    assert_tested_after_fit(got, expected, workers)


def test_lsgd_final_sync_leaves_every_worker_holding_the_leader(job: Path) -> None:
    got = results(job, "lsgd_final_sync")
    workers, _, _ = simulate_lsgd()
    leader, _ = sim.elect(workers, LSGD["leader_window"])
    for rank, result in enumerate(got):
        assert_states_close(result["state"], workers[leader].net.state_dict(), f"rank {rank} after final sync")


def test_lsgd_manual_optimization_and_nan_score_never_elected(job: Path) -> None:
    got = results(job, "lsgd_manual_nan_rank1")
    workers, rounds, _ = simulate_lsgd(nan_ranks=(1,))
    assert all(r["leader"] != 1 for r in rounds)
    for rank, result in enumerate(got):
        assert [int(r["lsgd/leader"]) for r in result["rounds"]] == [r["leader"] for r in rounds]
        assert_states_close(result["state"], workers[rank].net.state_dict(), f"rank {rank} (manual optimization)")


def test_lsgd_stops_with_a_clear_error_when_every_worker_diverged(job: Path) -> None:
    for rank, result in enumerate(results(job, "lsgd_manual_all_nan")):
        assert result["error"] is not None, f"rank {rank} kept training"
        assert "every worker diverged" in result["error"] and "step 3" in result["error"]


def test_lsgd_resets_a_diverged_worker_to_the_leader(job: Path) -> None:
    """Rank 1's weights become NaN at step 5; at the round after step 6 it takes the leader's weights and
    fresh optimizer state, and the job carries on as the simulation says."""
    got = results(job, "lsgd_diverge")
    workers, rounds, _ = simulate_lsgd(poison=(1, 4))
    assert all(r["leader"] != 1 for r in rounds if r["step"] == 6)
    for rank, result in enumerate(got):
        assert_states_close(result["state"], workers[rank].net.state_dict(), f"rank {rank}")
        assert all(torch.isfinite(v).all() for v in result["state"].values() if v.is_floating_point())
        assert result["rounds"][-1]["health/resets"] == (1 if rank == 1 else 0)
    assert any("rank 1 diverged" in w and "reset to the leader" in w for w in got[1]["warnings"])


def test_multi_leader_resets_a_diverged_worker(job: Path) -> None:
    got = results(job, "lsgd_multi_diverge")
    workers = sim.make_workers(WORLD)
    for step in range(1, STEPS + 1):
        for rank, worker in enumerate(workers):
            sim.local_step(worker, poison=(rank, step - 1) == (2, 4))
        if step % MULTI["local_tau"] == 0:
            sim.multi_leader_round(
                workers,
                [[0, 1], [2, 3]],
                MULTI["local_pull_strength"],
                MULTI["pull_strength"],
                MULTI["leader_window"],
                step % MULTI["tau"] == 0,
            )
    for rank, result in enumerate(got):
        assert_states_close(result["state"], workers[rank].net.state_dict(), f"rank {rank}")
        assert result["rounds"][-1]["health/resets"] == (1 if rank == 2 else 0)


def test_easgd_keeps_a_diverged_worker_out_of_the_center_and_resets_it(job: Path) -> None:
    got = results(job, "easgd_diverge")
    workers = sim.make_workers(WORLD)
    center = {k: v.clone() for k, v in workers[0].float_state().items()}
    for step in range(1, STEPS + 1):
        for rank, worker in enumerate(workers):
            sim.local_step(worker, poison=(rank, step - 1) == (1, 4))
        if step % EASGD["tau"] == 0:
            sim.easgd_round(workers, center, EASGD["beta"] / WORLD)
    assert all(torch.isfinite(c).all() for c in center.values())
    for rank, result in enumerate(got):
        assert_states_close(result["state"], workers[rank].net.state_dict(), f"rank {rank}")
        assert result["rounds"][-1]["health/resets"] == (1 if rank == 1 else 0)


def test_dataparallel_stops_with_a_clear_error_on_non_finite_gradients(job: Path) -> None:
    for rank, result in enumerate(results(job, "dataparallel_diverge")):
        assert result["error"] is not None and "non-finite at step 5" in result["error"], f"rank {rank}"


def test_ranks_with_different_epoch_lengths_are_refused_on_every_rank(job: Path) -> None:
    for rank, result in enumerate(results(job, "uneven_iterable")):
        assert result["error"] is not None, f"rank {rank} started training"
        assert "rank 0: 2, rank 1: 3, rank 2: 4, rank 3: 5" in result["error"], result["error"]


def test_same_seed_and_config_give_bitwise_identical_weights(job: Path) -> None:
    for first, second in zip(results(job, "lsgd"), results(job, "lsgd_repeat")):
        for key, value in first["state"].items():
            assert torch.equal(value, second["state"][key]), key


def test_lsgd_counts_real_optimizer_steps_under_gradient_accumulation(job: Path) -> None:
    got = results(job, "lsgd_accumulate")
    workers, rounds, _ = simulate_lsgd(steps=6, tau=2, micro_batches=2)
    for rank, result in enumerate(got):
        assert result["steps"] == 6 and result["comm"]["rounds"] == 3
        assert [int(r["lsgd/leader"]) for r in result["rounds"]] == [r["leader"] for r in rounds]
        assert_states_close(result["state"], workers[rank].net.state_dict(), f"rank {rank} (accumulation)")


# ----------------------------------------------------------------------------------------------------------------
# Multi-leader LSGD: 4 workers as 2 groups of 2
# ----------------------------------------------------------------------------------------------------------------
def test_multi_leader_update_matches_simulation_including_coinciding_rounds(job: Path) -> None:
    got = results(job, "lsgd_multi")
    workers = sim.make_workers(WORLD)
    groups = [[0, 1], [2, 3]]
    rounds = []
    for step in range(1, STEPS + 1):
        for worker in workers:
            sim.local_step(worker)
        if step % MULTI["local_tau"] == 0:
            both = step % MULTI["tau"] == 0
            outcome = sim.multi_leader_round(
                workers, groups, MULTI["local_pull_strength"], MULTI["pull_strength"], MULTI["leader_window"], both
            )
            rounds.append({"step": step, **outcome})
    assert any(r["global"] is not None for r in rounds) and any(r["global"] is None for r in rounds)
    model_bytes = sum(v.numel() * v.element_size() for v in sim.initial_net().state_dict().values())
    for rank, result in enumerate(got):
        assert_states_close(result["state"], workers[rank].net.state_dict(), f"rank {rank} final weights")
        assert [r["step"] for r in result["rounds"]] == [r["step"] for r in rounds]
        assert [int(r["lsgd/local_leader"]) for r in result["rounds"]] == [r["local"][rank] for r in rounds]
        logged_global = [int(r["lsgd/leader"]) if "lsgd/leader" in r else None for r in result["rounds"]]
        assert logged_global == [r["global"] for r in rounds]
        # traffic: scores (inter) every round; the local leader inside the group (intra); on global rounds the
        # leader's weights reach this rank's group once (inter, the rank in the leader's column), then fan out
        # inside the group (intra), except in the leader's own group, which already has them.
        expected_inter = expected_intra = 0
        for r in rounds:
            expected_inter += 4 * WORLD
            expected_intra += model_bytes
            if r["global"] is not None:
                same_column = rank % 2 == r["global"] % 2
                expected_inter += model_bytes if same_column else 0
                expected_intra += 0 if rank // 2 == r["global"] // 2 else model_bytes
        last = result["rounds"][-1]
        assert (last["comm/bytes_inter"], last["comm/bytes_intra"]) == (expected_inter, expected_intra)
        assert last["comm/bytes"] == expected_inter + expected_intra


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and exact resume (LSGD and EASGD)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lsgd_resume", "easgd_resume", "lsgd_multi_resume", "dataparallel_resume"])
def test_resume_from_mid_run_checkpoint_is_bitwise_exact(job: Path, name: str) -> None:
    """Weights, momentum, step count and communication totals of every worker equal the uninterrupted run's.

    DataParallel is exact up to float rounding: DDP rebuilds its gradient buckets after the first step of every
    run, and the resumed run's first step uses the initial layout, so the all-reduce sums in another order.
    """
    same = torch.equal if name != "dataparallel_resume" else lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    for rank, pair in enumerate(results(job, name)):
        a, b = pair["uninterrupted"], pair["resumed"]
        assert a["global_step"] == b["global_step"] > 0
        assert a["steps"] == b["steps"]
        for key in a["state"]:
            assert same(a["state"][key], b["state"][key]), f"rank {rank}: {key}"
        for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
            assert same(sa["momentum_buffer"], sb["momentum_buffer"]), f"rank {rank}: momentum"
        assert a["comm"]["bytes"] == b["comm"]["bytes"] and a["comm"]["rounds"] == b["comm"]["rounds"]
    if name != "dataparallel_resume":
        # the resumed weights differ between ranks: each rank restored its own shard, not a broadcast copy
        pairs = results(job, name)
        first, second = pairs[0]["resumed"]["state"], pairs[1]["resumed"]["state"]
        assert not torch.equal(first["body.0.weight"], second["body.0.weight"])


def test_resuming_with_another_number_of_workers_starts_everyone_from_the_leader(job: Path) -> None:
    main = torch.load(job / "lsgd_resume" / "ckpt_a" / "epoch=0.ckpt", weights_only=True)
    for rank, result in enumerate(results(job, "lsgd_resume_other_world")):
        for key, value in main["state_dict"].items():
            assert torch.equal(result["initial"][key], value), f"rank {rank}: {key}"
        if rank == 0:  # a rank-zero warning
            assert any("with 8 workers" in w and "leader weights" in w for w in result["warnings"])


def test_missing_or_corrupt_shard_fails_every_rank_with_a_clear_error(job: Path) -> None:
    for rank, result in enumerate(results(job, "lsgd_missing_shard")):
        error = result["error"]
        assert error is not None, f"rank {rank} resumed from a checkpoint with a missing shard"
        assert "rank(s) [1, 2]" in error and "broken.ckpt" in error, error
        if rank == 2:
            assert "rank_00002.pt does not exist" in error
        if rank == 1:
            assert "rank_00001.pt could not be read" in error


def test_lsgd_checkpoint_main_file_holds_the_leader(job: Path) -> None:
    path = job / "lsgd_resume" / "ckpt_a" / "epoch=1.ckpt"
    main = torch.load(path, weights_only=True)
    shards = [torch.load(Path(f"{path}.shards") / f"rank_{r:05d}.pt", weights_only=True) for r in range(WORLD)]
    scores = [float(s["strategy_state"]["losses"].mean()) for s in shards]  # full windows at epoch end
    leader = min(range(WORLD), key=lambda r: (scores[r], r))
    for key, value in main["state_dict"].items():
        assert torch.equal(value, shards[leader]["state_dict"][key]), key
    assert sorted(main["state_dict"]) == sorted(shards[leader]["state_dict"])
    # and Lightning's own loader gives that model back
    model = models.Regressor.load_from_checkpoint(path, weights_only=True)
    assert torch.equal(model.net.body[0].weight, shards[leader]["state_dict"]["net.body.0.weight"])


def test_easgd_checkpoint_main_file_holds_the_center(job: Path) -> None:
    path = job / "easgd_resume" / "ckpt_a" / "epoch=1.ckpt"
    main = torch.load(path, weights_only=True)
    shards = [torch.load(Path(f"{path}.shards") / f"rank_{r:05d}.pt", weights_only=True) for r in range(WORLD)]
    center = torch.cat([c for c in shards[0]["strategy_state"]["extra"]["center"]])
    for shard in shards[1:]:  # every worker keeps an identical copy of the center
        assert torch.equal(torch.cat(list(shard["strategy_state"]["extra"]["center"])), center)
    # the center is flat in the layout's order: parameters, then floating-point buffers
    net = models.Regressor()
    names = [n for n, _ in net.named_parameters()] + [n for n, b in net.named_buffers() if b.is_floating_point()]
    assert torch.equal(torch.cat([main["state_dict"][n].reshape(-1) for n in names]), center)


# ----------------------------------------------------------------------------------------------------------------
# EASGD
# ----------------------------------------------------------------------------------------------------------------
def simulate_easgd(val_every: int | None = None) -> tuple[list[sim.Worker], dict[str, torch.Tensor], list[float]]:
    workers = sim.make_workers(WORLD)
    center = {k: v.clone() for k, v in workers[0].float_state().items()}
    alpha = EASGD["beta"] / WORLD
    vals = []
    for step in range(1, STEPS + 1):
        for worker in workers:
            sim.local_step(worker)
        if step % EASGD["tau"] == 0:
            sim.easgd_round(workers, center, alpha)
        if val_every and step % val_every == 0:
            vals.append(sim.val_loss({**workers[0].net.state_dict(), **center}, WORLD))
    return workers, center, vals


def test_easgd_update_rule_matches_simulation(job: Path) -> None:
    got = results(job, "easgd")
    workers, _, _ = simulate_easgd()
    for rank, result in enumerate(got):
        assert result["comm"]["rounds"] == STEPS // EASGD["tau"]
        assert_states_close(result["state"], workers[rank].net.state_dict(), f"rank {rank} final weights")


def test_easgd_validates_the_center(job: Path) -> None:
    got = results(job, "easgd_eval_center")
    workers, _, vals = simulate_easgd(val_every=VAL_EVERY)
    assert_each_rank_validated(got, vals, workers)


def test_easgd_final_sync_leaves_every_worker_holding_the_center(job: Path) -> None:
    got = results(job, "easgd_final_sync")
    workers, center, _ = simulate_easgd()
    for rank, result in enumerate(got):
        floats = {k: v for k, v in result["state"].items() if v.is_floating_point()}
        assert_states_close(floats, center, f"rank {rank} after final sync")


# ----------------------------------------------------------------------------------------------------------------
# DataParallel and communication volume
# ----------------------------------------------------------------------------------------------------------------
def test_dataparallel_trajectory_equals_lightning_ddp(job: Path) -> None:
    ours, theirs = results(job, "dataparallel"), results(job, "ddp")
    for rank in range(WORLD):
        for key, value in theirs[rank]["state"].items():
            assert torch.equal(ours[rank]["state"][key], value), f"rank {rank}: {key}"
    for rank in range(1, WORLD):
        assert torch.equal(ours[rank]["state"]["body.0.weight"], ours[0]["state"]["body.0.weight"])
    d = sum(p.numel() for p in sim.initial_net().parameters())
    assert ours[0]["comm"]["bytes"] == STEPS * 4 * d
    assert ours[0]["comm"]["rounds"] == STEPS


def test_bytes_per_step_match_the_formulas(job: Path) -> None:
    """DataParallel 4d per step, EASGD 4d / tau, LSGD (4d + 4P) / tau, for d float32 parameters."""
    d = sum(p.numel() for p in sim.initial_net(with_buffers=False).parameters())
    tau, steps = 4, 8
    expected = {
        "bytes_dataparallel": 4 * d,
        "bytes_easgd": 4 * d / tau,
        "bytes_lsgd": (4 * d + 4 * WORLD) / tau,
    }
    for name, per_step in expected.items():
        for result in results(job, name):
            rounds = result["rounds"]
            assert rounds[-1]["comm/bytes"] / rounds[-1]["step"] == pytest.approx(per_step), name
            assert result["global_step"] == steps
            increments = {b["comm/bytes"] - a["comm/bytes"] for a, b in zip(rounds, rounds[1:])}
            step_gaps = {b["step"] - a["step"] for a, b in zip(rounds, rounds[1:])}
            assert len(increments) == 1 and increments.pop() / step_gaps.pop() == pytest.approx(per_step), name


def test_losses_recorded_are_finite_scores() -> None:
    """Sanity of the fixture itself: the simulated scores are finite and distinct across workers."""
    workers, _, _ = simulate_lsgd(steps=LSGD["tau"])
    scores = [w.score(LSGD["leader_window"]) for w in workers]
    assert all(math.isfinite(s) for s in scores) and len(set(scores)) == WORLD
