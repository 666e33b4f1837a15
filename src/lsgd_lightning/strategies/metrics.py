"""Logging a strategy's metrics from inside the strategy, without adding collectives."""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl


def log_rank_local(module: pl.LightningModule | None, metrics: Mapping[str, float]) -> None:
    """Log ``metrics`` through Lightning without syncing: a synced log would add a collective every time."""
    if metrics and module is not None and module._trainer is not None:
        module.log_dict(dict(metrics), on_step=True, on_epoch=False, sync_dist=False, batch_size=1)
