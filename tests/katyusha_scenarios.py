"""Katyusha X training runs executed inside each worker of a multi-process job, and the small problem they solve.

The problem is a sum of non-convex quadratics whose average is strongly convex (one shift-and-invert PCA system):
f(x) = (1/n) Σ_i f_i(x),  f_i(x) = λ/2 ‖x‖² − ½ (a_iᵀx)² − cᵀx,  with ‖a_i‖² > λ for most i (those f_i are
non-convex: Hessian λI − a_i a_iᵀ) and λ above the top eigenvalue of (1/n) Σ_i a_i a_iᵀ (f is strongly convex).
``run_katyusha_scenarios`` saves, per scenario and rank, what ``tests/test_katyusha_x.py`` compares with
``tests/katyusha_simulation.py``.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lsgd_lightning import KatyushaXStrategy
from tests.models import trainer_options
from tests.scenarios import run_scenarios

SEED = 1234
TIMEOUT = timedelta(seconds=60)
DIM, N, BATCH = 6, 96, 4  # 4 workers: 24 samples and 6 batches per worker and Lightning epoch
LR, TAU = 0.08, 0.2
EPOCH_LENGTH = 4  # Katyusha epochs start at steps 0, 4, 8, ...: they cross the Lightning epochs (6 steps)
STEPS = 18


def problem() -> tuple[Tensor, Tensor, float]:
    """(A: n x d rows a_i, c: d, λ), float32, the same in every process."""
    gen = torch.Generator().manual_seed(7)
    scales = torch.tensor([1.6, 1.2, 1.0, 0.8, 0.6, 0.5])
    a = torch.randn(N, DIM, generator=gen) * scales
    c = torch.randn(DIM, generator=gen)
    top = float(torch.linalg.eigvalsh(a.double().T @ a.double() / N)[-1])
    return a, c, top + 0.5


def initial_x() -> Tensor:
    return 0.3 * torch.randn(DIM, generator=torch.Generator().manual_seed(SEED))


class SumOfNonconvex(pl.LightningModule):
    """x is the only parameter; the loss of a batch is the mean of its f_i. Logs its loss (muted in extra passes)."""

    def __init__(self, lr: float = LR) -> None:
        super().__init__()
        self.x = nn.Parameter(initial_x())
        _, self.c, self.lam = problem()
        self.lr = lr

    def training_step(self, batch: tuple[Tensor], batch_idx: int) -> Tensor:
        (a,) = batch
        loss = (0.5 * self.lam * self.x.square().sum() - 0.5 * (a @ self.x).square() - self.c @ self.x).mean()
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class AdamModel(SumOfNonconvex):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class MomentumModel(SumOfNonconvex):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)


def train_loader() -> DataLoader:
    return DataLoader(TensorDataset(problem()[0]), batch_size=BATCH)


def fit(
    rank: int,
    world_size: int,
    strategy: KatyushaXStrategy,
    model_class: type[SumOfNonconvex] = SumOfNonconvex,
    steps: int = STEPS,
    **trainer_kwargs: Any,
) -> dict[str, Any]:
    """Train from rank-dependent initial weights (the strategy must start everyone from rank 0's)."""
    pl.seed_everything(SEED, verbose=False)
    model = model_class()
    with torch.no_grad():
        model.x.add_(0.5 * rank)
    ckpt_path = trainer_kwargs.pop("ckpt_path", None)
    trainer = pl.Trainer(**trainer_options(world_size, strategy, max_steps=steps, **trainer_kwargs))
    trainer.fit(model, train_loader(), ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return {
        "x": model.x.detach().clone(),
        "state": strategy._state_dict(),
        "comm": strategy.comm.state_dict(),
        "steps": strategy.steps,
        "global_step": trainer.global_step,
        "metrics": metrics,
    }


def resume_pair(rank: int, world_size: int, out: Path) -> dict[str, Any]:
    """3 Lightning epochs (18 steps) with a checkpoint per epoch; then again, resumed from the epoch-0 checkpoint
    (step 6, inside the second Katyusha epoch: snapshot, μ̃ and x̃_{s-1} must come back from the file)."""

    def run(name: str, ckpt_path: str | None) -> dict[str, Any]:
        checkpoints = ModelCheckpoint(
            dirpath=out / name, filename="{epoch}", save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True
        )
        strategy = KatyushaXStrategy(tau=TAU, epoch_length=EPOCH_LENGTH, timeout=TIMEOUT)
        return fit(
            rank,
            world_size,
            strategy,
            steps=-1,
            max_epochs=3,
            enable_checkpointing=True,
            callbacks=[checkpoints],
            ckpt_path=ckpt_path,
        )

    uninterrupted = run("a", None)
    return {"uninterrupted": uninterrupted, "resumed": run("b", str(out / "a" / "epoch=0.ckpt"))}


def expect_error(rank: int, world_size: int, model_class: type, **trainer_kwargs: Any) -> dict[str, Any]:
    """Training that must stop with a ValueError on every rank before its first optimizer step."""
    strategy = KatyushaXStrategy(tau=TAU, timeout=TIMEOUT)
    try:
        fit(rank, world_size, strategy, model_class=model_class, **trainer_kwargs)
    except ValueError as error:
        return {"error": str(error), "steps": strategy.steps}
    return {"error": None, "steps": strategy.steps}


def scenario(name: str, rank: int, world_size: int, out: Path) -> dict[str, Any]:
    if name == "katyusha":
        return fit(rank, world_size, KatyushaXStrategy(tau=TAU, epoch_length=EPOCH_LENGTH, timeout=TIMEOUT))
    if name == "svrg":  # τ = 1/2 and the default epoch length (one pass over the shard: 6 steps)
        return fit(rank, world_size, KatyushaXStrategy(tau=0.5, timeout=TIMEOUT), steps=14)
    if name == "resume":
        return resume_pair(rank, world_size, out)
    if name == "refuse_adam":
        return expect_error(rank, world_size, AdamModel)
    if name == "refuse_momentum":
        return expect_error(rank, world_size, MomentumModel)
    if name == "refuse_accumulation":
        return expect_error(rank, world_size, SumOfNonconvex, accumulate_grad_batches=2)
    raise KeyError(name)


def run_katyusha_scenarios(rank: int, world_size: int, out: str, names: list[str]) -> None:
    run_scenarios(rank, world_size, out, names, run=scenario, ignore=Warning)
