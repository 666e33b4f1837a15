"""D-PSGD, D², AD-PSGD and Signum: multi-process runs against an independent simulation, plus their building blocks.

One module-scoped job runs every scenario of ``tests/decentralized_scenarios.py`` in 4 spawned gloo workers; the
tests compare its saved results with ``tests/decentralized_simulation.py``, which replays the same workers, shards
and seed in one process. The rest are in-process checks: sign packing and the vote, mixing matrices and the D²
condition, the AD-PSGD pairing (bipartite, deterministic, deadlock-free), and the refusal of bad inputs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_module
from lightning.pytorch.strategies import StrategyRegistry

import lsgd_lightning
from lsgd_lightning.core import gossip as _gossip
from lsgd_lightning.core import signs as _signs
from lsgd_lightning.strategies import adpsgd
from lsgd_lightning.strategies.stepping import replaced_step
from lsgd_lightning.train import build_strategy
from tests import decentralized_simulation as sim
from tests import models
from tests.decentralized_scenarios import (
    ADPSGD_SEED,
    ADPSGD_STEPS,
    SEED,
    SIGNUM_LR,
    STEPS,
    VAL_EVERY,
    PlainSGDRegressor,
    SignumRegressor,
    run_decentralized_scenarios,
)
from tests.multiproc import assert_refused_before_the_first_step, rank_results, run_workers

WORLD = 4
SCENARIOS = [
    "dpsgd",
    "dpsgd_manual",
    "dpsgd_exponential",
    "d2",
    "d2_resume",
    "adpsgd",
    "signum",
    "signum_resume",
    "refuse_adam",
    "refuse_d2_momentum",
]
RTOL, ATOL = 1e-5, 1e-6
FLOAT_BYTES = 4 * sum(v.numel() for v in sim.start_state().values() if v.is_floating_point())  # params + input_mean
PARAMETERS = sum(p.numel() for p in models.Net().parameters())


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("decentralized")
    run_workers(run_decentralized_scenarios, WORLD, (str(out), SCENARIOS), errdir=out / "errors", timeout_s=300)
    return out


def results(job: Path, name: str) -> list[dict[str, Any]]:
    return rank_results(job, name, WORLD)


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for key, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(actual[key], value, rtol=RTOL, atol=ATOL, msg=f"{what}: {key}")
        else:
            assert torch.equal(actual[key], value), f"{what}: {key}"


# ----------------------------------------------------------------------------------------------------------------
# D-PSGD
# ----------------------------------------------------------------------------------------------------------------
def test_dpsgd_ring_matches_simulation_with_local_momentum_and_average_evaluation(job: Path) -> None:
    vals: dict[int, float] = {}

    def validate(step: int, workers: list[sim.SimWorker]) -> None:
        vals[step] = sim.val_loss(sim.average_state(workers), WORLD)

    workers, momenta = sim.dpsgd(WORLD, STEPS, lambda step: sim.ring(WORLD), on_step=validate)
    for rank, got in enumerate(results(job, "dpsgd")):
        assert got["steps"] == STEPS and got["comm"]["rounds"] == STEPS
        assert_close(got["state"], workers[rank].state(), f"rank {rank}")
        for (name, expected), state in zip(momenta[rank].items(), got["optimizer"]["state"].values()):
            torch.testing.assert_close(state["momentum_buffer"], expected, rtol=RTOL, atol=ATOL, msg=name)
        assert got["val_steps"][:2] == [VAL_EVERY, 6 + VAL_EVERY]  # val_check_interval counts batches per epoch
        expected_vals = [vals[step] for step in got["val_steps"]]
        assert got["val"] == pytest.approx(expected_vals, rel=1e-5), "validation sees the workers' average"
        # two neighbours, one send each per step; logged rank-locally every step
        assert [r["comm/bytes"] for r in got["rounds"][:VAL_EVERY]] == [2 * FLOAT_BYTES * s for s in (1, 2, 3, 4)]
        assert [r["step"] for r in got["rounds"]] == list(range(1, STEPS + 1))
        assert got["rounds"][-1]["comm/seconds"] > 0 and got["rounds"][-1]["dpsgd/mixing_distance"] > 0
    assert not torch.equal(results(job, "dpsgd")[0]["state"]["body.0.weight"], workers[1].state()["body.0.weight"])


def test_dpsgd_manual_optimization_matches_simulation(job: Path) -> None:
    workers, _ = sim.dpsgd(WORLD, STEPS, lambda step: sim.ring(WORLD))
    for rank, got in enumerate(results(job, "dpsgd_manual")):
        assert_close(got["state"], workers[rank].state(), f"rank {rank} (manual optimization)")


def test_dpsgd_exponential_one_peer_and_final_sync_to_the_average(job: Path) -> None:
    workers, _ = sim.dpsgd(WORLD, STEPS, lambda step: sim.one_peer_exponential(WORLD, step))
    average = sim.average_state(workers)
    for rank, got in enumerate(results(job, "dpsgd_exponential")):
        assert_close(got["state"], average, f"rank {rank} after the final sync")
        # one peer per step, then the final all-reduce of the floating-point state
        assert got["comm"]["bytes"] == STEPS * FLOAT_BYTES + FLOAT_BYTES


# ----------------------------------------------------------------------------------------------------------------
# D²
# ----------------------------------------------------------------------------------------------------------------
def test_d2_matches_simulation_on_the_lazy_ring(job: Path) -> None:
    workers = sim.d2(WORLD, STEPS, sim.ring(WORLD, lazy=True))
    dpsgd_like, _ = sim.dpsgd(WORLD, STEPS, lambda step: sim.ring(WORLD, lazy=True), momentum=0.0)
    differs = (workers[0].state()["body.0.weight"] - dpsgd_like[0].state()["body.0.weight"]).abs().max()
    assert differs > 1e-3, "the fixture must tell D² from D-PSGD"
    for rank, got in enumerate(results(job, "d2")):
        assert_close(got["state"], workers[rank].state(), f"rank {rank}")
        assert got["comm"]["bytes"] == STEPS * 2 * FLOAT_BYTES


@pytest.mark.parametrize("name", ["d2_resume", "signum_resume"])
def test_resume_is_bitwise_exact_including_algorithm_state(job: Path, name: str) -> None:
    for rank, pair in enumerate(results(job, name)):
        a, b = pair["uninterrupted"], pair["resumed"]
        assert a["global_step"] == b["global_step"] == a["steps"] == b["steps"] > 0
        for key in a["state"]:
            assert torch.equal(a["state"][key], b["state"][key]), f"rank {rank}: {key}"
        for key, saved in a["extra"].items():
            assert all(torch.equal(x, y) for x, y in zip(saved, b["extra"][key])), f"rank {rank}: {key}"
        assert a["comm"]["bytes"] == b["comm"]["bytes"] and a["comm"]["rounds"] == b["comm"]["rounds"]


def test_checkpoint_main_file_holds_the_workers_average(job: Path) -> None:
    path = job / "d2_resume" / "a" / "epoch=1.ckpt"
    main = torch.load(path, weights_only=True)["state_dict"]
    shards = [torch.load(Path(f"{path}.shards") / f"rank_{r:05d}.pt", weights_only=True) for r in range(WORLD)]
    for key, value in main.items():
        own = [s["state_dict"][key] for s in shards]
        if value.is_floating_point():
            torch.testing.assert_close(value, sum(own) / WORLD, msg=key)
            assert not torch.equal(own[0], own[1]) or key == "net.seen", key
        else:
            assert torch.equal(value, own[0]), key
    previous = shards[0]["strategy_state"]["extra"]["previous_half_step"]
    assert sum(t.numel() for t in previous) == FLOAT_BYTES // 4


# ----------------------------------------------------------------------------------------------------------------
# AD-PSGD
# ----------------------------------------------------------------------------------------------------------------
def test_adpsgd_matches_simulation_and_its_pairing_schedule(job: Path) -> None:
    workers, schedule = sim.adpsgd(WORLD, ADPSGD_STEPS, ADPSGD_SEED)
    served_twice = [step for step, pairs in enumerate(schedule, 1) if len(set(pairs.values())) < len(pairs)]
    assert served_twice and len(served_twice) < ADPSGD_STEPS, "fixture: some steps must have a passive serve two"
    for rank, got in enumerate(results(job, "adpsgd")):
        assert_close(got["state"], workers[rank].state(), f"rank {rank}")
        expected_rounds = []
        for step, pairs in enumerate(schedule, 1):
            partners = [pairs[rank]] if rank % 2 == 0 else sorted(a for a, p in pairs.items() if p == rank)
            if partners:
                expected_rounds.append((step, partners[0], len(partners)))
        logged = [(int(r["step"]), int(r["adpsgd/peer"]), int(r["adpsgd/exchanges"])) for r in got["rounds"]]
        assert logged == expected_rounds
        sends = sum(count for _, _, count in expected_rounds)
        assert got["comm"]["bytes"] == sends * FLOAT_BYTES and got["comm"]["rounds"] == len(expected_rounds)


# ----------------------------------------------------------------------------------------------------------------
# Signum
# ----------------------------------------------------------------------------------------------------------------
def test_signum_majority_vote_matches_simulation(job: Path) -> None:
    workers, momenta = sim.signum(WORLD, STEPS, SIGNUM_LR)
    average = sim.average_state(workers)
    got = results(job, "signum")
    for rank, result in enumerate(got):
        params = {k: v for k, v in result["state"].items() if k.startswith("body.")}
        for key in params:  # one model: the replicas' parameters are bitwise identical
            assert torch.equal(params[key], got[0]["state"][key]), f"rank {rank}: {key}"
        assert_close(result["state"], average, f"rank {rank} (parameters + averaged buffers after final sync)")
        for saved, expected in zip(result["extra"]["momentum"], momenta[rank].values()):
            torch.testing.assert_close(saved, expected, rtol=RTOL, atol=ATOL)
        # d/8 bytes per step: ceil(d / 32) int32 words; then the final all-reduce of the floating-point state
        assert result["comm"]["bytes"] == STEPS * 4 * math.ceil(PARAMETERS / 32) + FLOAT_BYTES
        assert 0.0 <= result["rounds"][-1]["signum/agreement"] <= 1.0
    assert len({round(r["rounds"][-1]["signum/agreement"], 6) for r in got}) > 1, "metrics are rank-local"


# ----------------------------------------------------------------------------------------------------------------
# Refusals at the start of training (every rank, before the first step)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("refuse_adam", "D-PSGD supports torch.optim.SGD only"),
        ("refuse_d2_momentum", "D² does not support SGD momentum=0.9 (param group 0)"),
    ],
)
def test_unsupported_optimizers_are_refused_before_the_first_step(job: Path, name: str, message: str) -> None:
    assert_refused_before_the_first_step(results(job, name), message)


# ----------------------------------------------------------------------------------------------------------------
# Sign packing and the majority vote
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("numel", [0, 1, 31, 32, 33, 64, 95, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64])
def test_sign_packing_round_trip(numel: int, dtype: torch.dtype) -> None:
    values = (torch.randn(numel, generator=torch.Generator().manual_seed(numel)) * 10).to(dtype)
    values[::7] = 0  # zeros are sent as +1
    words = _signs.pack_signs(values)
    assert words.dtype == torch.int32 and words.numel() == math.ceil(numel / 32)
    expected = torch.where(values >= 0, 1, -1).to(torch.int8)
    assert torch.equal(_signs.unpack_signs(words, numel), expected)


def test_sign_packing_layout_shapes_and_size() -> None:
    values = torch.full((40,), -1.0)
    values[[0, 31, 33]] = 1.0
    values[32] = -0.0  # negative zero is still "not negative"
    words = _signs.pack_signs(values.view(5, 8))
    assert words.tolist() == [(1 + 2**31) - 2**32, 0b11]  # bit k of word w is coordinate 32 w + k
    assert _signs.pack_signs(torch.randn(3200)).numel() * 4 == 3200 // 8  # d / 8 bytes


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 5])
def test_majority_vote_is_the_sign_of_the_sum_of_signs(workers: int) -> None:
    generator = torch.Generator().manual_seed(workers)
    signs = torch.where(torch.rand(workers, 77, generator=generator) < 0.5, 1, -1)
    gathered = torch.stack([_signs.pack_signs(row) for row in signs])
    vote = _signs.majority_vote_packed(gathered, 77)
    assert torch.equal(vote, torch.sign(signs.sum(0)).to(torch.int8))
    assert bool((vote == 0).any()) == (workers % 2 == 0 and bool((signs.sum(0) == 0).any()))


# ----------------------------------------------------------------------------------------------------------------
# Mixing matrices and the D² condition
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize(("spec", "lazy"), [("ring", False), ("ring", True), ("exponential", False)])
def test_topologies_are_doubly_stochastic_and_plans_agree(world_size: int, spec: str, lazy: bool) -> None:
    topology = _gossip.Topology(spec, world_size, lazy=lazy)
    for step in range(1, 6):
        matrix = topology.matrix(step)
        ones = torch.ones(world_size, dtype=torch.float64)
        assert torch.allclose(matrix.sum(0), ones) and torch.allclose(matrix.sum(1), ones) and (matrix >= 0).all()
        plans = [topology.plan(rank, step) for rank in range(world_size)]
        for i, plan in enumerate(plans):  # i sends to j exactly when j receives from i
            for j in plan.send_to:
                assert i in [source for source, _ in plans[j].receive_from]
            assert plan.self_weight + sum(w for _, w in plan.receive_from) == pytest.approx(1.0)


def test_ring_weights_and_eigenvalues() -> None:
    ring = _gossip.ring_matrix(4)
    assert ring[0].tolist() == pytest.approx([1 / 3, 1 / 3, 0, 1 / 3])
    assert _gossip.smallest_eigenvalue(ring) == pytest.approx(-1 / 3)
    assert _gossip.smallest_eigenvalue(_gossip.lazy_matrix(ring)) == pytest.approx(1 / 3)
    assert _gossip.ring_matrix(2).tolist() == [[0.5, 0.5], [0.5, 0.5]]


def test_exponential_one_peer_averages_exactly_over_a_period() -> None:
    topology = _gossip.Topology("exponential", 8)
    product = torch.eye(8, dtype=torch.float64)
    for step in range(1, 4):
        plan = topology.plan(0, step)
        assert len(plan.send_to) == len(plan.receive_from) == 1 and plan.self_weight == 0.5
        product = topology.matrix(step) @ product
    assert torch.allclose(product, torch.full((8, 8), 1 / 8, dtype=torch.float64))


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        ([[1.0]], "must be 2 x 2"),
        ([[0.5, 0.5], [0.6, 0.4]], "must sum to 1"),
        ([[1.5, -0.5], [-0.5, 1.5]], "non-negative"),
        ([[0.5, 0.5], [0.0, 1.0]], "every column"),
        ([[1.0, 0.0], [0.0, 1.0]], "not connected"),
        ([[0.0, 1.0], [1.0, 0.0]], r"rho = max\(\|lambda_2\|, \|lambda_P\|\) = 1\.000000"),
        ([["a", "b"], ["c", "d"]], "P x P matrix of numbers"),
    ],
)
def test_bad_mixing_matrices_are_refused(matrix: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _gossip.Topology(matrix, 2)


def test_custom_matrix_plan() -> None:
    topology = _gossip.Topology([[0.5, 0.5, 0.0], [0.5, 0.25, 0.25], [0.0, 0.25, 0.75]], 3)
    assert topology.plan(0, 1) == _gossip.MixingPlan(0.5, ((1, 0.5),), (1,))
    assert topology.plan(2, 7) == _gossip.MixingPlan(0.75, ((1, 0.25),), (1,))


@pytest.mark.parametrize(
    ("matrix", "rho"),
    [
        ([[0.0, 0.5, 0.0, 0.5], [0.5, 0.0, 0.5, 0.0], [0.0, 0.5, 0.0, 0.5], [0.5, 0.0, 0.5, 0.0]], 1.0),  # 4-cycle
        ([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], None),  # cyclic shift: not symmetric
    ],
)
def test_matrices_whose_gossip_never_reaches_consensus_are_refused(matrix: Any, rho: float | None) -> None:
    message = r"\) = 1\.000000, but gossip reaches consensus" if rho is not None else "must be symmetric"
    with pytest.raises(ValueError, match=message):
        _gossip.Topology(matrix, len(matrix))
    if rho is not None:
        assert _gossip.spectral_gap_rho(torch.tensor(matrix)) == pytest.approx(rho)
    assert _gossip.spectral_gap_rho(_gossip.ring_matrix(4)) == pytest.approx(1 / 3)  # the ring mixes


def test_d2_enforces_its_condition_on_w() -> None:
    with pytest.raises(ValueError, match=r"smallest eigenvalue above -1/3.*ring topology with 4 workers has -0\.3333"):
        lsgd_lightning.D2Strategy(lazy=False)._check_world_size(4)
    lsgd_lightning.D2Strategy()._check_world_size(4)  # the lazy ring (default)
    lsgd_lightning.D2Strategy(lazy=False)._check_world_size(3)  # an odd ring is fine
    with pytest.raises(ValueError, match="fixed mixing matrix"):
        lsgd_lightning.D2Strategy(topology="exponential")
    with pytest.raises(ValueError, match="symmetric"):
        lsgd_lightning.D2Strategy(topology=[[0.5, 0.5, 0], [0, 0.5, 0.5], [0.5, 0, 0.5]], lazy=False)._check_world_size(
            3
        )


# ----------------------------------------------------------------------------------------------------------------
# AD-PSGD pairing
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("world_size", "topology"), [(2, "ring"), (4, "ring"), (6, "ring"), (5, "complete"), (8, "complete")]
)
def test_adpsgd_pairing_is_bipartite_deterministic_and_covers_every_neighbour(world_size: int, topology: str) -> None:
    chosen: dict[int, set[int]] = {a: set() for a in range(0, world_size, 2)}
    for step in range(1, 201):
        pairs = adpsgd.pairing(step, world_size, topology, seed=7)
        assert pairs == adpsgd.pairing(step, world_size, topology, seed=7)
        assert sorted(pairs) == list(range(0, world_size, 2))  # every active has exactly one partner
        for active, passive in pairs.items():
            assert adpsgd.is_active(active) and not adpsgd.is_active(passive)
            assert passive in adpsgd.passive_neighbours(active, world_size, topology)
            assert adpsgd.partners_of(active, pairs) == [passive] and active in adpsgd.partners_of(passive, pairs)
            chosen[active].add(passive)
    for active, passives in chosen.items():
        assert passives == set(adpsgd.passive_neighbours(active, world_size, topology))
    assert adpsgd.pairing(1, world_size, topology, seed=7) != adpsgd.pairing(1, world_size, topology, seed=8) or (
        world_size == 2
    )


@pytest.mark.parametrize(("world_size", "topology"), [(4, "ring"), (8, "ring"), (7, "complete"), (16, "complete")])
def test_adpsgd_exchanges_never_deadlock(world_size: int, topology: str) -> None:
    """Play each step's blocking pairwise exchanges (every bucket, every partner, in the strategy's order): an
    exchange happens when it is next for both of its ranks; the step must always finish."""
    buckets = 3
    for step in range(1, 101):
        pairs = adpsgd.pairing(step, world_size, topology, seed=0)
        queues = {
            rank: [(b, peer) for b in range(buckets) for peer in adpsgd.partners_of(rank, pairs)]
            for rank in range(world_size)
        }
        while any(queues.values()):
            ready = [
                rank
                for rank, queue in queues.items()
                if queue and queues[queue[0][1]] and queues[queue[0][1]][0] == (queue[0][0], rank)
            ]
            assert ready, f"step {step}: every remaining exchange waits on another: {queues}"
            for rank in ready:
                queues[rank].pop(0)


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs, optimizer checks, registration, configs
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: lsgd_lightning.DPSGDStrategy(topology="star"), "topology must be one of"),
        (lambda: lsgd_lightning.DPSGDStrategy(lazy="yes"), "lazy must be True or False"),
        (lambda: lsgd_lightning.DPSGDStrategy(eval_on="leader"), "eval_on must be 'average' or 'local'"),
        (lambda: lsgd_lightning.ADPSGDStrategy(topology="exponential"), "AD-PSGD topology must be one of"),
        (lambda: lsgd_lightning.ADPSGDStrategy(seed="x"), "seed must be an integer"),
        (lambda: lsgd_lightning.ADPSGDStrategy()._check_world_size(5), "even number of workers"),
        (lambda: lsgd_lightning.DPSGDStrategy(topology=[[1.0]])._check_world_size(2), "must be 2 x 2"),
        (lambda: lsgd_lightning.SignumStrategy(bucket_cap_mb=0), "bucket_cap_mb"),
    ],
)
def test_bad_arguments_are_refused(make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def sgd(**kwargs: Any) -> torch.optim.SGD:
    return torch.optim.SGD(models.Net().parameters(), lr=0.1, **kwargs)


@pytest.mark.parametrize(
    ("strategy", "optimizers", "message"),
    [
        ("DPSGDStrategy", lambda: [torch.optim.Adam(models.Net().parameters())], "D-PSGD supports torch.optim.SGD"),
        ("DPSGDStrategy", lambda: [sgd(), sgd()], "exactly one optimizer .*, got 2: SGD, SGD"),
        ("ADPSGDStrategy", lambda: [torch.optim.AdamW(models.Net().parameters())], "AD-PSGD supports torch.optim.SGD"),
        ("D2Strategy", lambda: [sgd(momentum=0.9, nesterov=True)], "momentum=0.9"),
        ("D2Strategy", lambda: [torch.optim.RMSprop(models.Net().parameters())], "D² supports torch.optim.SGD"),
        ("SignumStrategy", lambda: [sgd(momentum=0.9, nesterov=True)], "nesterov=True"),
        ("SignumStrategy", lambda: [sgd(momentum=0.9, dampening=0.5)], "dampening=0.5"),
        ("SignumStrategy", lambda: [sgd(momentum=1.0)], "momentum=1.0"),
        ("SignumStrategy", lambda: [sgd(maximize=True)], "maximize=True"),
        ("SignumStrategy", lambda: [torch.optim.Adam(models.Net().parameters())], "Signum supports torch.optim.SGD"),
    ],
)
def test_unsupported_optimizers_are_named(strategy: str, optimizers: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        getattr(lsgd_lightning, strategy)()._check_optimizers(optimizers())


@pytest.mark.parametrize(
    ("strategy", "optimizer"),
    [
        ("DPSGDStrategy", lambda: sgd(momentum=0.9, nesterov=True, weight_decay=1e-4)),
        ("ADPSGDStrategy", lambda: sgd(momentum=0.9, weight_decay=1e-4)),
        ("D2Strategy", lambda: sgd(weight_decay=1e-4)),
        ("SignumStrategy", lambda: sgd(momentum=0.9, weight_decay=1e-4)),
        ("SignumStrategy", lambda: sgd()),  # signSGD
    ],
)
def test_supported_optimizers_pass(strategy: str, optimizer: Any) -> None:
    getattr(lsgd_lightning, strategy)()._check_optimizers([optimizer()])


def test_signum_runs_the_closure_without_sgds_update() -> None:
    net = models.Net()
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0, momentum=0.9)
    before = [p.detach().clone() for p in net.parameters()]
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        loss = net.loss(torch.randn(4, models.IN), torch.randn(4, models.OUT), train=True)
        loss.backward()
        return loss

    with replaced_step(optimizer):
        optimizer.step(closure)
    assert calls == [1] and all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert optimizer.state_dict()["state"] == {} and "step" not in optimizer.__dict__
    optimizer.step()  # the real step is back
    assert not torch.equal(before[0], next(net.parameters()))


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("dpsgd", lsgd_lightning.DPSGDStrategy),
        ("d2", lsgd_lightning.D2Strategy),
        ("adpsgd", lsgd_lightning.ADPSGDStrategy),
        ("signum", lsgd_lightning.SignumStrategy),
    ],
)
def test_registered_names_and_hydra_configs(name: str, cls: type) -> None:
    for alias, start_method in ((name, "popen"), (f"{name}_spawn", "spawn")):
        strategy = StrategyRegistry.get(alias)
        assert type(strategy) is cls and strategy._start_method == start_method
    with initialize_config_module("lsgd_lightning.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"strategy={name}", "strategy.timeout_s=60"])
    strategy = build_strategy(cfg)
    assert type(strategy) is cls and strategy.eval_on == "average" and strategy._timeout.total_seconds() == 60


# ----------------------------------------------------------------------------------------------------------------
# A single worker (in this process): D² is plain SGD, Signum is local Signum
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["d2", "signum"])
def test_single_worker_runs_the_local_algorithm(name: str) -> None:
    steps = 6
    pl.seed_everything(SEED, verbose=False)
    model = PlainSGDRegressor() if name == "d2" else SignumRegressor()
    strategy = lsgd_lightning.D2Strategy() if name == "d2" else lsgd_lightning.SignumStrategy()
    trainer = pl.Trainer(**models.trainer_options(1, strategy, max_steps=steps))
    trainer.fit(model, models.train_loader(1))
    if name == "d2":
        expected = sim.d2(1, steps, torch.ones(1, 1, dtype=torch.float64))[0].state()
    else:
        expected = sim.signum(1, steps, SIGNUM_LR)[0][0].state()
    assert strategy.comm.bytes == 0 and strategy.steps == steps
    assert_close(model.net.state_dict(), expected, f"{name} on one worker")
