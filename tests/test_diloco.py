"""DiLoCo and Streaming DiLoCo: the outer model and codec by hand, the settings, and 4-worker runs against the
independent simulation (``tests/diloco_simulation.py``).

The strategies run in one module-scoped job of 4 spawned gloo workers (``tests/diloco_scenarios.py``).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lsgd_lightning import DiLoCoStrategy, StreamingDiLoCoStrategy
from lsgd_lightning.core.flat import FlatLayout
from lsgd_lightning.core.fragments import Fragment, split_tensors
from lsgd_lightning.core.outer import OuterModel
from lsgd_lightning.core.quantize import Quantized, dequantize, error_bound, payload_bytes, quantize
from tests import diloco_simulation as dsim
from tests import models
from tests import simulation as sim
from tests.diloco_scenarios import DILOCO, STREAMING, run_diloco_scenarios
from tests.multiproc import rank_results, scenario_job
from tests.scenarios import STEPS

WORLD = 4
TOL = {"rtol": 1e-5, "atol": 1e-5}
SCENARIOS = [
    "diloco",
    "diloco_diverge",
    "diloco_eval",
    "diloco_final_sync",
    "diloco_resume",
    "bytes_diloco",
    "streaming",
    "streaming_diverge",
    "streaming_eval",
    "streaming_resume",
    "bytes_streaming_8",
    "bytes_streaming_4",
]


# ----------------------------------------------------------------------------------------------------------------
# The outer model, the codec and the fragments, by hand
# ----------------------------------------------------------------------------------------------------------------
def test_outer_model_takes_nesterov_steps_on_parameters_and_averages_buffers() -> None:
    mask = torch.tensor([True, False])
    factory = functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)
    outer = OuterModel([torch.tensor([1.0, 2.0])], [mask], factory)
    outer.step([torch.tensor([0.5, 0.5])])
    # b = 0.5; θ = 1 - 0.7 (0.5 + 0.9 * 0.5) = 0.335; the buffer becomes θ - Δ = 1.5
    assert outer.flats[0].tolist() == pytest.approx([0.335, 1.5], abs=1e-7)
    outer.step([torch.tensor([-0.2, 1.0])])
    # b = 0.9 * 0.5 - 0.2 = 0.25; θ = 0.335 - 0.7 (-0.2 + 0.9 * 0.25) = 0.3175; buffer 1.5 - 1 = 0.5
    assert outer.flats[0].tolist() == pytest.approx([0.3175, 0.5], abs=1e-7)


def test_outer_model_state_round_trips_and_refuses_another_shape() -> None:
    factory = functools.partial(torch.optim.SGD, lr=0.5, momentum=0.9)
    a = OuterModel([torch.tensor([1.0, 2.0])], [torch.tensor([True, True])], factory)
    a.step([torch.tensor([1.0, -1.0])])
    b = OuterModel([torch.zeros(2)], [torch.tensor([True, True])], factory)
    b.load_state_dict(a.state_dict(), "θ")
    for model in (a, b):
        model.step([torch.tensor([0.5, 0.5])])
    assert torch.equal(a.flats[0], b.flats[0])  # the momentum came along
    with pytest.raises(RuntimeError, match="θ does not match"):
        OuterModel([torch.zeros(3)], [torch.ones(3, dtype=torch.bool)], factory).load_state_dict(a.state_dict(), "θ")


def test_outer_optimizer_must_be_an_optimizer() -> None:
    with pytest.raises(ValueError, match="outer_optimizer must return a torch.optim.Optimizer"):
        OuterModel([torch.zeros(2)], [torch.ones(2, dtype=torch.bool)], lambda params: object())  # type: ignore[arg-type]


def test_theta_and_fragments_are_float32_masters_of_a_half_precision_model() -> None:
    module = torch.nn.Linear(3, 2).to(torch.bfloat16)
    layout = FlatLayout(module, bucket_cap_bytes=1 << 20)
    outer = OuterModel(layout.masters(), layout.parameter_masks(module), functools.partial(torch.optim.SGD, lr=1.0))
    before = outer.flats[0].clone()
    assert before.dtype == torch.float32
    outer.step([torch.full_like(before, -(2**-12))])  # θ ← θ + 2^-12: below bfloat16's resolution near 1
    assert torch.equal(outer.flats[0], before + 2**-12)
    fragment = Fragment(["weight"], [module.weight], torch.ones(6, dtype=torch.bool))
    assert fragment.pack().dtype == torch.float32
    fragment.unpack(torch.arange(6, dtype=torch.float32))  # written back once, in the model's dtype
    assert module.weight.dtype == torch.bfloat16 and module.weight.flatten().tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_round_trip_within_the_bound_and_payload_size(bits: int) -> None:
    x = torch.randn(101, generator=torch.Generator().manual_seed(0))
    q = quantize(x, bits, block=16)
    assert q.to_bytes().numel() == payload_bytes(101, bits, 16) == math.ceil(101 * bits / 8) + 4 * 7
    decoded = dequantize(q)
    assert bool(((decoded - x).abs() <= error_bound(x, bits, 16) * (1 + 1e-6)).all())
    assert torch.equal(decoded, dsim.fake_quantize(x, bits, 16))  # the simulation's codec, written separately
    assert q.finite and not quantize(torch.tensor([1.0, math.nan]), bits, 16).finite
    # payloads follow each other in an all-gather's buffer at any byte offset (here 13 or 79 bytes long)
    short = quantize(x[:13], bits, 16)
    joined = torch.cat([short.to_bytes(), q.to_bytes()])
    second = Quantized.from_bytes(joined[short.to_bytes().numel() :], 101, bits, 16)
    assert torch.equal(dequantize(second), decoded)


def test_quantize_by_hand() -> None:
    # block max 2 -> scale 2/127; 1.0 -> round(63.5) = 64 (half to even) -> 64 * 2 / 127
    decoded = dequantize(quantize(torch.tensor([2.0, 1.0, 0.0, -2.0]), 8, 4))
    assert decoded.tolist() == pytest.approx([2.0, 128 / 127, 0.0, -2.0], abs=1e-7)
    assert dequantize(quantize(torch.tensor([0.0, 0.0]), 4, 2)).tolist() == [0.0, 0.0]


def test_split_tensors_balances_contiguous_groups() -> None:
    assert split_tensors([48, 8, 24, 3, 6], 3) == [[0], [1, 2], [3, 4]]
    # the first group closes early so that each later group still gets a tensor
    assert split_tensors([1, 1, 1, 100], 3) == [[0, 1], [2], [3]]
    assert split_tensors([5, 5], 1) == [[0, 1]]
    with pytest.raises(ValueError, match="into 3 fragments"):
        split_tensors([1, 1], 3)


# ----------------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tau": 0}, "tau"),
        ({"outer_lr": 0.0}, "outer_lr"),
        ({"outer_momentum": 1.0}, "outer_momentum"),
        ({"outer_momentum": 0.0}, "nesterov=True needs outer_momentum"),
        ({"outer_optimizer": 3}, "outer_optimizer must be a callable"),
        ({"outer_optimizer": functools.partial(torch.optim.Adam, lr=0.1), "outer_lr": 0.1}, "outer_lr=0.1 conflict"),
    ],
)
def test_bad_diloco_settings_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DiLoCoStrategy(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tau": 4, "fragments": 5}, r"fragments \(5\) must be at most tau \(4\)"),
        ({"tau": 4, "overlap_steps": 4}, r"overlap_steps \(4\) must be smaller than tau"),
        ({"mixing_alpha": 1.5}, "mixing_alpha"),
        ({"quantize_bits": 16}, "quantize_bits"),
        ({"quantize_block": 0}, "quantize_block"),
    ],
)
def test_bad_streaming_settings_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StreamingDiLoCoStrategy(**kwargs)


def test_more_fragments_than_tensors_is_refused_when_training_starts() -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=StreamingDiLoCoStrategy(tau=8, fragments=6, overlap_steps=1),
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(
        ValueError, match=r"fragments \(6\) must be at most the model's number of floating-point tensors \(5\)"
    ):
        trainer.fit(models.Regressor(), models.train_loader(1))


def test_custom_outer_optimizer_factory_is_used() -> None:
    factory = functools.partial(torch.optim.Adam, lr=0.01)
    assert DiLoCoStrategy(outer_optimizer=factory)._outer_factory is factory


# ----------------------------------------------------------------------------------------------------------------
# 4 workers against the simulation
# ----------------------------------------------------------------------------------------------------------------
job = scenario_job("diloco", run_diloco_scenarios, WORLD, SCENARIOS, timeout_s=600)


def results(job: Path, name: str) -> list[dict[str, Any]]:
    return rank_results(job, name, WORLD)


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    for key, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(actual[key], value, **TOL, msg=f"{what}: {key}")
        else:
            assert torch.equal(actual[key], value), f"{what}: {key}"


def _diloco_sim(steps: int = STEPS, tau: int = DILOCO["tau"], val_every: int | None = None) -> dict[str, Any]:
    return dsim.diloco(WORLD, steps, tau, DILOCO["outer_lr"], DILOCO["outer_momentum"], val_every)


def test_diloco_matches_the_simulation(job: Path) -> None:
    expected = _diloco_sim()
    for rank, result in enumerate(results(job, "diloco")):
        assert result["comm"]["rounds"] == STEPS // DILOCO["tau"]
        assert_close(result["state"], expected["workers"][rank].net.state_dict(), f"rank {rank}")
        assert set(result["rounds"][0]) >= {"diloco/outer_grad_norm", "diloco/dist_to_global", "comm/bytes"}


def test_diloco_simulation_would_notice_a_wrong_outer_rule() -> None:
    """The comparison can fail: plain averaging (outer lr 1, no momentum) ends elsewhere."""
    nesterov = _diloco_sim()["theta"]
    averaging = dsim.diloco(WORLD, STEPS, DILOCO["tau"], 1.0, 0.0)["theta"]
    assert not torch.allclose(nesterov["body.0.weight"], averaging["body.0.weight"], **TOL)


def test_diloco_leaves_a_diverged_worker_out_of_the_average_and_resets_it(job: Path) -> None:
    expected = dsim.diloco(WORLD, STEPS, DILOCO["tau"], DILOCO["outer_lr"], DILOCO["outer_momentum"], poison=(1, 5))
    assert all(bool(torch.isfinite(v).all()) for v in expected["theta"].values())
    for rank, result in enumerate(results(job, "diloco_diverge")):
        assert_close(result["state"], expected["workers"][rank].net.state_dict(), f"rank {rank}")
        assert result["rounds"][-1]["health/resets"] == (1 if rank == 1 else 0)
        assert any("rank 1 diverged" in w for w in result["warnings"]) == (rank == 1)


def test_diloco_validates_theta(job: Path) -> None:
    expected = _diloco_sim(val_every=3)
    for rank, result in enumerate(results(job, "diloco_eval")):
        assert result["val"] == pytest.approx(expected["vals"], rel=1e-5)
        assert_close(result["state"], expected["workers"][rank].net.state_dict(), f"rank {rank} after validations")


def test_diloco_final_sync_leaves_every_worker_holding_theta(job: Path) -> None:
    expected = _diloco_sim(steps=12)
    for rank, result in enumerate(results(job, "diloco_final_sync")):
        assert_close(result["state"], expected["theta"], f"rank {rank}")


def _assert_exact_resume(pairs: list[dict[str, Any]]) -> None:
    for rank, pair in enumerate(pairs):
        a, b = pair["uninterrupted"], pair["resumed"]
        assert a["global_step"] == b["global_step"] > 0 and a["steps"] == b["steps"]
        for key in a["state"]:
            assert torch.equal(a["state"][key], b["state"][key]), f"rank {rank}: {key}"
        for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
            assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"]), f"rank {rank}: inner momentum"
        assert a["comm"]["bytes"] == b["comm"]["bytes"] and a["comm"]["rounds"] == b["comm"]["rounds"]


def test_diloco_resume_is_exact_and_the_main_file_holds_theta(job: Path) -> None:
    _assert_exact_resume(results(job, "diloco_resume"))
    path = job / "diloco_resume" / "ckpt_a" / "epoch=1.ckpt"
    main = torch.load(path, weights_only=True)
    shards = [torch.load(Path(f"{path}.shards") / f"rank_{r:05d}.pt", weights_only=True) for r in range(WORLD)]
    outers = [s["strategy_state"]["extra"]["outers"][0] for s in shards]
    theta = torch.cat(outers[0]["flats"])
    for outer in outers[1:]:  # identical everywhere, outer momentum included
        assert torch.equal(torch.cat(outer["flats"]), theta)
        assert torch.equal(
            outer["optimizer"]["state"][0]["momentum_buffer"], outers[0]["optimizer"]["state"][0]["momentum_buffer"]
        )
    names = dsim.floating_names(sim.initial_net())
    assert torch.equal(torch.cat([main["state_dict"][f"net.{n}"].reshape(-1) for n in names]), theta)


def _per_step(result: dict[str, Any]) -> float:
    last = result["rounds"][-1]
    return last["comm/bytes"] / last["step"]


def test_diloco_sends_4d_bytes_per_tau_steps(job: Path) -> None:
    d = sum(p.numel() for p in sim.initial_net(with_buffers=False).parameters())
    for result in results(job, "bytes_diloco"):
        assert result["global_step"] == 8 and result["comm"]["rounds"] == 2
        assert result["comm"]["bytes"] == 2 * 4 * d
        assert _per_step(result) == pytest.approx(4 * d / 4)


# ----------------------------------------------------------------------------------------------------------------
# Streaming DiLoCo
# ----------------------------------------------------------------------------------------------------------------
def _streaming_sim(val_every: int | None = None, poison: tuple[int, int] | None = None, **overrides: Any) -> dict:
    s = {**STREAMING, **overrides}
    return dsim.streaming(
        WORLD,
        STEPS,
        s["tau"],
        s["fragments"],
        s["overlap_steps"],
        s["mixing_alpha"],
        s["quantize_bits"],
        s["quantize_block"],
        s["outer_lr"],
        s["outer_momentum"],
        val_every,
        poison,
    )


def test_streaming_matches_its_simulation(job: Path) -> None:
    expected = _streaming_sim()
    assert expected["groups"] == [["body.0.weight"], ["body.0.bias", "body.2.weight"], ["body.2.bias", "input_mean"]]
    for rank, result in enumerate(results(job, "streaming")):
        assert_close(result["state"], expected["workers"][rank].net.state_dict(), f"rank {rank}")


def test_streaming_leaves_a_diverged_worker_out_of_a_fragment_and_resets_it(job: Path) -> None:
    expected = _streaming_sim(poison=(1, 5))
    assert all(bool(torch.isfinite(v).all()) for v in expected["theta"].values())
    for rank, result in enumerate(results(job, "streaming_diverge")):
        assert_close(result["state"], expected["workers"][rank].net.state_dict(), f"rank {rank}")
        assert any("rank 1 diverged" in w for w in result["warnings"]) == (rank == 1)


def test_streaming_validates_theta_without_the_fragments_in_flight(job: Path) -> None:
    expected = _streaming_sim(val_every=3)
    for rank, result in enumerate(results(job, "streaming_eval")):
        assert result["val"] == pytest.approx(expected["vals"], rel=1e-5)
        assert_close(result["state"], expected["workers"][rank].net.state_dict(), f"rank {rank} after validations")


def test_streaming_simulation_would_notice_a_wrong_mix_or_overlap() -> None:
    expected = _streaming_sim()["theta"]["body.0.weight"]
    for change in ({"mixing_alpha": 0.0}, {"overlap_steps": 0}):
        other = _streaming_sim(**change)["theta"]["body.0.weight"]
        assert not torch.allclose(expected, other, **TOL), change


def test_streaming_posts_and_waits_from_the_training_thread_k_steps_apart(job: Path) -> None:
    tau, fragments, k = STREAMING["tau"], STREAMING["fragments"], STREAMING["overlap_steps"]
    for result in results(job, "streaming"):
        posts = [entry for entry in result["log"] if entry["op"] == "post" and entry["async"]]
        waits = [entry for entry in result["log"] if entry["op"] == "wait"]
        assert all(entry["main"] for entry in result["log"])
        starts = [t for t in range(1, STEPS + 1) if any(t % tau == f * tau // fragments for f in range(fragments))]
        assert [p["step"] for p in posts] == starts
        # each wait comes k steps after its post, except the last, waited for when fit ends
        assert [w["step"] for w in waits][:-1] == [t + k for t in starts][:-1]
        assert waits[-1]["step"] == STEPS


def test_streaming_resume_is_exact(job: Path) -> None:
    _assert_exact_resume(results(job, "streaming_resume"))


@pytest.mark.parametrize("bits", [8, 4])
def test_streaming_bytes_per_fragment_and_precision(job: Path, bits: int) -> None:
    """Per synchronization of a fragment of d_f values: an all-gather of P payloads of ⌈d_f·b/8⌉ + 4⌈d_f/B⌉ bytes."""
    block = STREAMING["quantize_block"]
    d = sum(p.numel() for p in sim.initial_net(with_buffers=False).parameters())
    for result in results(job, f"bytes_streaming_{bits}"):
        sizes = [48, 8 + 24 + 3]  # body.0.weight | the rest (the first tensor already reaches half of 83)
        assert sum(sizes) == d
        per_fragment = [WORLD * payload_bytes(n, bits, block) for n in sizes]
        assert result["fragment_bytes"] == per_fragment
        # tau 4, F 2: fragment 0 after steps 4, 8; fragment 1 after steps 2, 6
        assert result["comm"]["bytes"] == 2 * sum(per_fragment)
        assert result["comm"]["rounds"] == 4
