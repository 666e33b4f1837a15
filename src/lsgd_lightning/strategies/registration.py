"""Registration of the strategy names with Lightning."""

from __future__ import annotations

from typing import Any

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
