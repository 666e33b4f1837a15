"""The LightningModule shared by all benchmark networks: cross-entropy, accuracy, SGD with step LR drops."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from .cnn7 import CNN7
from .resnet import resnet20, resnet50
from .vgg import VGG16

NETWORKS: dict[str, Callable[..., nn.Module]] = {
    "cnn7": CNN7,
    "vgg16": VGG16,
    "resnet20": resnet20,
    "resnet50": resnet50,
}


def build_network(name: str, *, num_classes: int, in_channels: int, image_size: int, **kwargs: Any) -> nn.Module:
    """Instantiate the network registered as ``name`` (one of :data:`NETWORKS`)."""
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; allowed: {', '.join(sorted(NETWORKS))}")
    return NETWORKS[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)


def check_sgd_settings(
    lr: float, momentum: float, nesterov: bool, weight_decay: float, milestones: Sequence[int], gamma: float
) -> None:
    """Raise ``ValueError`` naming the offending setting when the SGD/LR-schedule values cannot be right."""
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if nesterov and momentum == 0:
        raise ValueError("nesterov=true needs momentum > 0")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if any(int(m) != m or m < 1 for m in milestones) or list(milestones) != sorted(set(milestones)):
        raise ValueError(f"milestones must be increasing positive epoch numbers, got {list(milestones)}")


class ImageClassifier(pl.LightningModule):
    """Image classification with one of the benchmark networks.

    Training metrics are logged per step and rank-locally on purpose: ``sync_dist=True`` in ``training_step`` would
    all-reduce every step, which is exactly the communication the LSGD/EASGD strategies exist to avoid. Validation and
    test accuracy are torchmetrics objects, synchronised once per epoch when Lightning computes them.
    """

    def __init__(
        self,
        arch: str = "cnn7",
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 28,
        arch_kwargs: dict[str, Any] | None = None,
        lr: float = 0.05,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 1e-4,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        milestones = [int(m) for m in milestones]
        check_sgd_settings(lr, momentum, nesterov, weight_decay, milestones, gamma)
        self.save_hyperparameters()
        self.net = build_network(
            arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size, **(arch_kwargs or {})
        )
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.detach().argmax(dim=1) == y).float().mean()
        # Rank-local, per step: no sync_dist (see the class docstring).
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", acc)
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, metric: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        # One all-reduce per epoch (epoch-level reduction), not per step.
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), sync_dist=True)
        metric(logits, y)
        self.log(f"{stage}/acc", metric, prog_bar=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def on_train_end(self) -> None:
        """Record the step count and this rank's communication totals as ``run/*`` entries of callback_metrics.

        Done here, in the worker, because the spawn launcher hands only rank 0's ``callback_metrics`` back to the
        parent process (whose ``global_step`` stays 0). The totals come from the strategy's counters when it has
        them (``strategy.comm.metrics()``, exact even before the first round), else from the logged ``comm/*``.
        """
        metrics = self.trainer.callback_metrics
        steps = self.trainer.global_step
        metrics["run/global_step"] = torch.tensor(float(steps))
        counters = getattr(self.trainer.strategy, "comm", None)
        if callable(getattr(counters, "metrics", None)):
            totals = dict(counters.metrics())
        else:
            totals = {key: metrics[key] for key in ("comm/bytes", "comm/seconds", "comm/rounds") if key in metrics}
        for key, value in totals.items():
            metrics["run/" + key.replace("/", "_")] = torch.as_tensor(float(value), dtype=torch.float64)
        if "comm/bytes" in totals and steps > 0:
            metrics["run/comm_bytes_per_step"] = torch.tensor(float(totals["comm/bytes"]) / steps, dtype=torch.float64)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(),
            lr=hp.lr,
            momentum=hp.momentum,
            nesterov=hp.nesterov,
            weight_decay=hp.weight_decay,
        )
        if not hp.milestones:
            return optimizer
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(hp.milestones), gamma=hp.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
