"""Reference simulation of data-parallel Katyusha X and of plain SVRG: P workers in one process, float64 tensor math.

Written from the algorithm statement (SVRG epochs; between epochs y_{s+1} = (3/2 x̃_{s+1} + 1/2 y_s − (1 − τ) x̃_s) /
(1 + τ) with y_0 = x̃_0 = x_0; see ``lsgd_lightning/optim.py`` for the sources), not from the strategy: explicit
gradients of the quadratic components, the full gradient in closed form (not a pass over shards), the line in the
source's form. Worker r at step t reads the batch Lightning's shuffled ``DistributedSampler`` gives its rank.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tests.katyusha_scenarios import BATCH, SEED, N, initial_x, problem


def _data() -> tuple[Tensor, Tensor, float]:
    a, c, lam = problem()
    return a.double(), c.double(), lam


def batch_indices(world_size: int, step: int) -> list[list[int]]:
    """Per rank, the sample indices of the ``step``-th batch (0-based), as DistributedSampler(seed=SEED) shards."""
    per_epoch = N // world_size // BATCH
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(N, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()
    return [order[rank::world_size][index * BATCH : (index + 1) * BATCH] for rank in range(world_size)]


def batch_gradient(x: Tensor, rows: list[int]) -> Tensor:
    """∇f_B(x) = λx − (1/|B|) Σ_{i∈B} a_i a_iᵀ x − c."""
    a, c, lam = _data()
    block = a[rows]
    return lam * x - block.T @ (block @ x) / len(rows) - c


def batch_loss(x: Tensor, rows: list[int]) -> float:
    a, c, lam = _data()
    return float((0.5 * lam * x @ x - 0.5 * (a[rows] @ x).square() - c @ x).mean())


def full_gradient(x: Tensor) -> Tensor:
    """∇f(x) = (λI − AᵀA/n) x − c, in closed form."""
    a, c, lam = _data()
    return lam * x - a.T @ (a @ x) / N - c


def run(world_size: int, steps: int, lr: float, epoch_length: int, tau: float | None) -> dict[str, object]:
    """Katyusha X (``tau`` a number) or plain SVRG (``tau=None``: the next epoch starts where the last ended)."""
    x = initial_x().double()
    snapshot = previous_output = x.clone()
    mu = torch.zeros_like(x)
    last_losses: list[float] = []
    epochs = 0
    for step in range(steps):
        if step % epoch_length == 0:
            if step > 0:
                output = x.clone()
                if tau is not None:
                    x = (1.5 * output + 0.5 * snapshot - (1 - tau) * previous_output) / (1 + tau)
                previous_output = output
            snapshot = x.clone()
            mu = full_gradient(snapshot)
            epochs += 1
        shards = batch_indices(world_size, step)
        last_losses = [batch_loss(x, rows) for rows in shards]
        direction = sum(batch_gradient(x, rows) - batch_gradient(snapshot, rows) for rows in shards) / world_size
        x = x - lr * (direction + mu)
    return {
        "x": x,
        "snapshot": snapshot,
        "previous_output": previous_output,
        "full_gradient": mu,
        "epochs": epochs,
        "last_losses": last_losses,
    }
