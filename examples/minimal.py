"""Leader SGD as a drop-in Lightning strategy: the smallest complete example.

    python examples/minimal.py                      # Leader SGD, 4 CPU worker processes
    python examples/minimal.py --strategy easgd     # or "dataparallel", or Lightning's own "ddp"

Only two lines differ from a plain Lightning script: ``import lsgd_lightning`` and ``strategy="lsgd"``.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lsgd_lightning  # noqa: F401  (registers "lsgd", "easgd", "dataparallel" with Lightning)


def blobs(n: int, seed: int) -> TensorDataset:
    """Three Gaussian clusters in 2-D: a classification task that needs no download."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=generator)
    centers = torch.tensor([[0.0, 2.0], [2.0, -1.0], [-2.0, -1.0]])
    return TensorDataset(centers[labels] + torch.randn(n, 2, generator=generator), labels)


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 3))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)  # rank-local: no sync_dist in training_step
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        accuracy = (self.net(x).argmax(-1) == y).float().mean()
        self.log("val_acc", accuracy, sync_dist=True)  # the leader's accuracy on the whole validation set

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", default="lsgd")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--max-epochs", type=int, default=3)
    args = parser.parse_args()

    pl.seed_everything(0)  # the same seed on every worker: it also seeds the DistributedSampler's shuffling
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy,
        max_epochs=args.max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    model = Classifier()
    trainer.fit(model, DataLoader(blobs(2048, 0), batch_size=32), DataLoader(blobs(512, 1), batch_size=128))
    metrics = trainer.callback_metrics
    if trainer.is_global_zero:
        rounds = int(metrics.get("comm/rounds", torch.tensor(0)))
        per_step = float(metrics.get("comm/bytes", torch.tensor(0))) / trainer.global_step
        print(
            f"strategy={args.strategy} workers={trainer.world_size} val_acc={float(metrics['val_acc']):.3f} "
            f"rounds={rounds} bytes_per_step={per_step:.0f}"
        )


if __name__ == "__main__":
    main()
