"""Registration of strategy names and rank-local metric logging, shared by every strategy of the package."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.strategies import _StrategyRegistry


def register_launcher_variants(registry: _StrategyRegistry, strategy_cls: type, name: str, **init_params: Any) -> None:
    """Register ``name`` (subprocess launcher) and ``name_spawn`` (spawn launcher), once, with ``init_params``.

    Lightning has no entry point for third-party strategy names; registering at import time is what works, also in
    the launcher's child processes (they import the package again). Guarded, so a second import is harmless.
    """
    for alias, start_method in ((name, "popen"), (f"{name}_spawn", "spawn")):
        if alias not in registry:
            registry.register(
                alias,
                strategy_cls,
                description=f"{strategy_cls.__name__} with start_method='{start_method}'",
                start_method=start_method,
                **init_params,
            )


def log_rank_local(module: pl.LightningModule | None, metrics: Mapping[str, float]) -> None:
    """Log ``metrics`` through Lightning without syncing: a synced log would add a collective every time."""
    if metrics and module is not None and module._trainer is not None:
        module.log_dict(dict(metrics), on_step=True, on_epoch=False, sync_dist=False, batch_size=1)
