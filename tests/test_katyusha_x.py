"""Katyusha X: the pure update functions (closed-form values), the one-device optimizer, and the data-parallel strategy.

The strategy runs in one module-scoped job of 4 spawned gloo workers (``tests/katyusha_scenarios.py``) and is
compared with ``tests/katyusha_simulation.py``, an independent float64 replay of the same workers and shards.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lsgd_lightning.optim import (
    KatyushaX,
    check_tau,
    full_gradient_closure,
    katyusha_momentum,
    svrg_step,
    theory_tau,
    variance_reduced_gradient,
)
from tests import katyusha_simulation as sim
from tests.katyusha_scenarios import DIM, EPOCH_LENGTH, LR, STEPS, TAU, run_katyusha_scenarios
from tests.multiproc import assert_refused_before_the_first_step, rank_results, scenario_job

WORLD = 4
SCENARIOS = ["katyusha", "svrg", "resume", "refuse_adam", "refuse_momentum", "refuse_accumulation"]
RTOL, ATOL = 1e-5, 1e-6


def close(actual: Tensor, expected: Tensor, what: str) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=RTOL, atol=ATOL, msg=what)


# ----------------------------------------------------------------------------------------------------------------
# Pure functions, by hand
# ----------------------------------------------------------------------------------------------------------------
def test_variance_reduced_gradient_and_inner_step() -> None:
    g = variance_reduced_gradient(torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0]), torch.tensor([3.0, 0.0]))
    assert g.tolist() == [3.5, 3.0]  # 1 - 0.5 + 3, 2 + 1 + 0
    assert svrg_step(torch.tensor([1.0, 1.0]), torch.tensor([2.0, -4.0]), 0.25).tolist() == [0.5, 2.0]


def test_momentum_line_by_hand() -> None:
    # (1.5 * 2 + 0.5 * 1 - 0.75 * 0) / 1.25 = 2.8
    value = katyusha_momentum(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([0.0]), 0.25)
    assert value.item() == pytest.approx(2.8, rel=1e-7)
    # tau = 1/2: (1.5 * 1 + 0.5 * 3 - 0.5 * 2) / 1.5 = 4/3 = x~' + (y - x~) / 3
    double = torch.float64
    value = katyusha_momentum(*(torch.tensor([v], dtype=double) for v in (1.0, 3.0, 2.0)), 0.5)
    assert value.item() == pytest.approx(4 / 3, rel=1e-15)


def test_tau_one_half_is_plain_svrg_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(0)
    out, start = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
    assert torch.equal(katyusha_momentum(out, start, start.clone(), 0.5), out)  # y_s = x~_s: no move at all


def test_momentum_line_is_the_linear_coupling_form_with_z_eliminated() -> None:
    """(A) x_{k+1} = τz_k + (1-τ)y_k; y_{k+1} = SVRG(x_{k+1}); g = (x_{k+1} - y_{k+1})/(mη);
    z_{k+1} = argmin ‖z - z_k‖²/(2α) + <g, z> + σ/4 ‖z - y_{k+1}‖², α = mη/(2τ), σ = 4τ²/(mη), gives (B)."""
    m, eta, tau = 7, 0.03, 0.3
    alpha, sigma = m * eta / (2 * tau), 4 * tau**2 / (m * eta)
    gen = torch.Generator().manual_seed(1)
    epoch = torch.randn(4, 4, generator=gen, dtype=torch.float64) / 3  # any map stands for one SVRG epoch

    def svrg(start: Tensor) -> Tensor:
        return epoch @ start + 0.1

    x0 = torch.randn(4, generator=gen, dtype=torch.float64)
    z = y = x0.clone()  # (A)
    start, output, previous = x0.clone(), x0.clone(), x0.clone()  # (B): y_s, x~_{s+1}, x~_s
    for _ in range(6):
        x = tau * z + (1 - tau) * y
        y = svrg(x)
        g = (x - y) / (m * eta)
        z = (z / alpha - g + sigma / 2 * y) / (1 / alpha + sigma / 2)
        output = svrg(start)
        start, previous = katyusha_momentum(output, start, previous, tau), output
        torch.testing.assert_close(start, tau * z + (1 - tau) * y, rtol=1e-12, atol=1e-12)


def test_theory_tau_and_argument_checks() -> None:
    assert theory_tau(100, 0.01, 0.04) == pytest.approx(0.1)  # sqrt(100 * 0.01 * 0.04) / 2
    assert theory_tau(100, 1.0, 1.0) == 0.5  # capped: plain SVRG
    for bad in (0, -0.1, 0.6, True, "0.2"):
        with pytest.raises(ValueError, match="tau"):
            check_tau(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epoch_length"):
        KatyushaX([nn.Parameter(torch.zeros(1))], lr=0.1, epoch_length=0, tau=0.2, full_gradient=lambda: None)


# ----------------------------------------------------------------------------------------------------------------
# The one-device optimizer
# ----------------------------------------------------------------------------------------------------------------
class Quadratics(nn.Module):
    """f_i(x) = h_i x²/2 - c_i x for the samples (h_i, c_i) it is given; returns the per-sample values."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.zeros(dim, dtype=torch.float64))

    def forward(self, samples: Tensor) -> Tensor:
        h, c = samples[:, : self.x.numel()], samples[:, self.x.numel() :]
        return (0.5 * h * self.x.square() - c * self.x).sum(1)


def train(samples: Tensor, steps: int, lr: float, tau: float, dim: int = 1) -> tuple[Quadratics, KatyushaX]:
    model = Quadratics(dim)
    data = TensorDataset(samples, torch.zeros(len(samples)))

    def loss_fn(values: Tensor, _: Tensor) -> Tensor:
        return values.mean()

    loader = DataLoader(data, batch_size=1)
    opt = KatyushaX(
        model.parameters(),
        lr=lr,
        epoch_length=len(loader),
        tau=tau,
        full_gradient=full_gradient_closure(model, loss_fn, DataLoader(data, batch_size=len(samples) - 1)),
    )
    batches = iter(())
    for _ in range(steps):
        try:
            inputs, targets = next(batches)
        except StopIteration:
            batches = iter(loader)
            inputs, targets = next(batches)

        def closure(inputs: Tensor = inputs, targets: Tensor = targets) -> Tensor:
            opt.zero_grad()
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            return loss

        opt.step(closure)
    return model, opt


def test_optimizer_by_hand_on_two_components_one_non_convex() -> None:
    """f_1 = 3x²/2 - x, f_2 = -x²/2 - x (non-convex), f = x²/2 - x; x_0 = 0, η = 1/2, τ = 1/4, m = 2.

    epoch 0: μ~ = -1; x = 0.5 (g = -1); x = 1.25 (g = -1.5 + 1 - 1). epoch 1: y_1 = 1.875/1.25 = 1.5, μ~ = 0.5;
    x = 1.25 (g = 0.5); x = 0.875 (g = -2.25 + 2.5 + 0.5). epoch 2: y_2 = (1.3125 + 0.75 - 0.9375)/1.25 = 0.9,
    μ~ = -0.1; x = 0.95."""
    samples = torch.tensor([[3.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
    model, opt = train(samples, 4, lr=0.5, tau=0.25)
    assert model.x.item() == pytest.approx(0.875, rel=1e-14)
    state = opt.state[model.x]
    assert (state["snapshot"].item(), state["previous_output"].item(), state["full_gradient"].item()) == pytest.approx(
        (1.5, 1.25, 0.5), rel=1e-14
    )
    model, opt = train(samples, 5, lr=0.5, tau=0.25)
    assert model.x.item() == pytest.approx(0.95, rel=1e-14)
    assert opt.state[model.x]["snapshot"].item() == pytest.approx(0.9, rel=1e-14)


def test_optimizer_with_tau_one_half_is_svrg() -> None:
    gen = torch.Generator().manual_seed(3)
    samples = torch.cat([torch.randn(8, 3, generator=gen, dtype=torch.float64) * 2 + 1, torch.randn(8, 3)], 1)
    model, _ = train(samples, 20, lr=0.05, tau=0.5, dim=3)
    h, c = samples[:, :3], samples[:, 3:]
    x = torch.zeros(3, dtype=torch.float64)  # SVRG written out: snapshot = the previous epoch's last iterate
    for step in range(20):
        if step % 8 == 0:
            snapshot, mu = x.clone(), h.mean(0) * x - c.mean(0)
        i = step % 8
        x = x - 0.05 * (h[i] * x - h[i] * snapshot + mu)
    torch.testing.assert_close(model.x.detach(), x, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# The strategy: 4 workers against the simulation
# ----------------------------------------------------------------------------------------------------------------
job = scenario_job("katyusha", run_katyusha_scenarios, WORLD, SCENARIOS, timeout_s=240)


def results(job: Path, name: str) -> list[dict[str, Any]]:
    return rank_results(job, name, WORLD)


def test_strategy_matches_the_simulation(job: Path) -> None:
    expected = sim.run(WORLD, STEPS, LR, EPOCH_LENGTH, TAU)
    epochs = math.ceil(STEPS / EPOCH_LENGTH)
    assert expected["epochs"] == epochs == 5
    for rank, got in enumerate(results(job, "katyusha")):
        assert got["steps"] == got["global_step"] == STEPS
        close(got["x"], expected["x"], f"rank {rank}: x")
        close(got["state"]["snapshot"][0], expected["snapshot"], f"rank {rank}: snapshot y_s")
        close(got["state"]["previous_output"][0], expected["previous_output"], f"rank {rank}: x~_s")
        close(got["state"]["full_gradient"][0], expected["full_gradient"], f"rank {rank}: mu~")
        # every step one all-reduce of d floats; every epoch one of d + 1 (the gradient sum and the sample count)
        assert got["comm"]["bytes"] == 4 * DIM * STEPS + 4 * (DIM + 1) * epochs
        assert got["comm"]["rounds"] == STEPS
        assert got["metrics"]["katyusha_x/epoch"] == epochs - 1
        # the extra passes are muted: what the module logged is its own loss at x on its own last batch
        assert got["metrics"]["train_loss_step"] == pytest.approx(expected["last_losses"][rank], rel=1e-5)
    fixture = sim.run(WORLD, STEPS, LR, EPOCH_LENGTH, None)["x"]
    assert (fixture - expected["x"]).abs().max() > 1e-3, "the fixture must tell Katyusha X from SVRG"


def test_tau_one_half_matches_plain_svrg(job: Path) -> None:
    expected = sim.run(WORLD, 14, LR, 6, None)  # SVRG, the default epoch length: one pass over the shard
    for rank, got in enumerate(results(job, "svrg")):
        close(got["x"], expected["x"], f"rank {rank}: x")
        close(got["state"]["snapshot"][0], expected["snapshot"], f"rank {rank}: snapshot")
        assert got["comm"]["bytes"] == 4 * DIM * 14 + 4 * (DIM + 1) * 3


def test_resume_continues_the_same_trajectory(job: Path) -> None:
    for rank, pair in enumerate(results(job, "resume")):
        a, b = pair["uninterrupted"], pair["resumed"]
        assert a["steps"] == b["steps"] == a["global_step"] == b["global_step"] == 18
        torch.testing.assert_close(b["x"], a["x"], rtol=1e-6, atol=1e-7, msg=f"rank {rank}")
        for key in ("snapshot", "previous_output", "full_gradient"):
            torch.testing.assert_close(b["state"][key][0], a["state"][key][0], rtol=1e-6, atol=1e-7, msg=key)
        assert a["comm"]["bytes"] == b["comm"]["bytes"]
    close(results(job, "resume")[0]["uninterrupted"]["x"], sim.run(WORLD, 18, LR, EPOCH_LENGTH, TAU)["x"], "x")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("refuse_adam", "Katyusha X supports exactly one torch.optim.SGD"),
        ("refuse_momentum", "Katyusha X does not support SGD momentum=0.9 (param group 0)"),
        ("refuse_accumulation", "Katyusha X does not support accumulate_grad_batches=2"),
    ],
)
def test_unsupported_settings_are_refused_before_the_first_step(job: Path, name: str, message: str) -> None:
    assert_refused_before_the_first_step(results(job, name), message)


def test_strategy_arguments_are_checked_when_built() -> None:
    from lsgd_lightning import KatyushaXStrategy

    with pytest.raises(ValueError, match="tau must be"):
        KatyushaXStrategy(tau=0.7)
    with pytest.raises(ValueError, match="epoch_length must be"):
        KatyushaXStrategy(epoch_length=0)
    with pytest.raises(TypeError, match="ddp_comm_hook"):
        KatyushaXStrategy(ddp_comm_hook=lambda *a: None)
