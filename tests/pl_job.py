"""A 2-worker job on the standalone ``pytorch_lightning`` package; run by ``tests/test_namespaces.py`` in a subprocess.

    python tests/pl_job.py name          # pytorch_lightning.Trainer(strategy="lsgd"), the package imported first
    python tests/pl_job.py instance      # strategy=lsgd_lightning.pytorch_lightning.LSGDStrategy(...)
    python tests/pl_job.py cli ARGS...   # pytorch_lightning.cli.LightningCLI with ARGS (e.g. --trainer.strategy lsgd)

The subprocess launcher re-runs this file for rank 1. Every rank writes ``result-<rank>.json`` into the working
directory at the end.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

import lsgd_lightning  # first on purpose: pytorch_lightning's names must appear when it is imported afterwards

STEPS = 16  # the default tau of the name "lsgd": one round


class PLRegressor(pl.LightningModule):
    """A pytorch_lightning module (a lightning.pytorch one would be refused by pytorch_lightning's Trainer)."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4, generator=gen)
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


class Report(pl.Callback):
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = trainer.strategy
        bases = [f"{c.__module__}.{c.__name__}" for c in type(strategy).__mro__]
        result = {
            "rank": trainer.global_rank,
            "class": f"{type(strategy).__module__}.{type(strategy).__name__}",
            "pl_base": "pytorch_lightning.strategies.ddp.DDPStrategy" in bases,
            "lightning_base": any(b.startswith("lightning.") for b in bases),
            "rounds": strategy.comm.rounds,
            "steps": trainer.global_step,
        }
        Path(f"result-{trainer.global_rank}.json").write_text(json.dumps(result))


def trainer_options() -> dict:
    return {
        "accelerator": "cpu",
        "devices": 2,
        "max_steps": STEPS,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": [Report()],
    }


if __name__ == "__main__":
    mode = sys.argv[1]
    pl.seed_everything(0, verbose=False)
    if mode == "name":
        pl.Trainer(strategy="lsgd", **trainer_options()).fit(PLRegressor())
    elif mode == "instance":
        strategy = lsgd_lightning.pytorch_lightning.LSGDStrategy(tau=2, timeout=timedelta(seconds=60))
        pl.Trainer(strategy=strategy, **trainer_options()).fit(PLRegressor())
    elif mode == "cli":
        from pytorch_lightning.cli import LightningCLI

        options = {k: v for k, v in trainer_options().items() if k != "callbacks"}
        LightningCLI(PLRegressor, trainer_defaults={**options, "callbacks": [Report()]}, args=["fit", *sys.argv[2:]])
