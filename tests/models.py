"""Tiny module-level models, data and Trainer settings shared by the distributed scenarios and the reference
simulation.

The model is deliberately small but has what the strategies must handle: two layers, a floating-point buffer
that the forward pass uses (mixed like a parameter) and an integer buffer (copied from the leader).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

IN, HIDDEN, OUT = 6, 8, 3
N_TRAIN, N_VAL, BATCH = 96, 32, 4
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 1e-3


def trainer_options(world_size: int, strategy: pl.strategies.Strategy | str, **overrides: Any) -> dict[str, Any]:
    """The tests' Trainer settings: ``world_size`` CPU processes, no logger, checkpoints, progress bar, model summary
    or sanity validation; ``overrides`` added last (they win)."""
    return {
        "accelerator": "cpu",
        "devices": world_size,
        "strategy": strategy,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        **overrides,
    }


def dataset(n: int, seed: int, world_size: int) -> tuple[Tensor, Tensor]:
    """Regression data whose noise depends on index % world_size, so the shards differ in difficulty."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=gen)
    w = torch.randn(IN, OUT, generator=gen)
    noise_scale = torch.tensor([0.1 + 0.6 * ((i * 7) % world_size) / world_size for i in range(n)])
    y = x @ w + noise_scale[:, None] * torch.randn(n, OUT, generator=gen)
    return x, y


def train_loader(world_size: int, shuffle: bool = False) -> DataLoader:
    return DataLoader(TensorDataset(*dataset(N_TRAIN, 0, world_size)), batch_size=BATCH, shuffle=shuffle)


def val_loader(world_size: int) -> DataLoader:
    return DataLoader(TensorDataset(*dataset(N_VAL, 1, world_size)), batch_size=BATCH)


class Net(nn.Module):
    def __init__(self, with_buffers: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))
        self.with_buffers = with_buffers
        if with_buffers:
            self.register_buffer("input_mean", torch.zeros(IN))
            self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def loss(self, x: Tensor, y: Tensor, train: bool) -> Tensor:
        if self.with_buffers:
            if train:
                with torch.no_grad():
                    self.input_mean.mul_(0.9).add_(x.mean(0), alpha=0.1)
                    self.seen += x.shape[0]
            x = x - self.input_mean
        return nn.functional.mse_loss(self.body(x), y)


def make_optimizer(params, nesterov: bool = False) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, nesterov=nesterov)


class Regressor(pl.LightningModule):
    """Automatic optimization; logs val_loss with sync_dist (so it is the mean over the whole validation set)."""

    def __init__(self, with_buffers: bool = True) -> None:
        super().__init__()
        self.net = Net(with_buffers)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.net.loss(*batch, train=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.net.loss(*batch, train=False), sync_dist=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("test_loss", self.net.loss(*batch, train=False), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters())


class NesterovRegressor(Regressor):
    """The same model with Nesterov SGD (what EASGD's ``momentum_rule="eamsgd"`` takes its η, δ and λ from)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters(), nesterov=True)


class BatchNormNet(nn.Module):
    """A hidden layer with BatchNorm (running statistics: floating-point buffers, plus an integer counter)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(IN, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))

    def loss(self, x: Tensor, y: Tensor, train: bool) -> Tensor:
        return nn.functional.mse_loss(self.body(x), y)


class BatchNormRegressor(Regressor):
    """:class:`Regressor` with :class:`BatchNormNet` (what the BatchNorm re-estimation of the average needs)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = BatchNormNet()


class ManualRegressor(Regressor):
    """The same math in manual optimization; ``report_nan_on`` ranks return NaN as their loss (training is fine)."""

    def __init__(self, report_nan_on: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.report_nan_on = report_nan_on

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        opt = self.optimizers()
        opt.zero_grad()
        loss = self.net.loss(*batch, train=True)
        self.manual_backward(loss)
        opt.step()
        if self.global_rank in self.report_nan_on:
            return torch.tensor(math.nan)
        return loss.detach()


class DivergingRegressor(Regressor):
    """Rank ``rank``'s weights become NaN just before the forward pass of step ``step`` (0-based global step)."""

    def __init__(self, rank: int, step: int) -> None:
        super().__init__()
        self.diverge_rank, self.diverge_step = rank, step

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if self.global_rank == self.diverge_rank and self.global_step == self.diverge_step:
            with torch.no_grad():
                self.net.body[0].weight.fill_(math.nan)
        return super().training_step(batch, batch_idx)


class UnevenIterable(IterableDataset):
    """An iterable dataset whose length depends on the rank: ranks would take different numbers of steps."""

    def __len__(self) -> int:
        return 8 + 4 * torch.distributed.get_rank()

    def __iter__(self):
        x, y = dataset(len(self), 0, 1)
        return iter(zip(x, y))
