"""DOWNPOUR SGD (Dean et al., NIPS 2012), the asynchronous parameter-server baseline of the LSGD and EASGD papers.

A parameter holder keeps the model w on the job's store (:class:`~._board.StoreBoard`). Every worker trains its
replica at its own pace from the parameters it last fetched, x_fetched; after every ``tau``-th of its *own* optimizer
steps, worker i pushes its accumulated update and fetches fresh parameters, in one transaction under the board's
lock::

    delta_i = x_i - x_fetched          (the sum of its tau local updates; parameters only)
    w       <- w + delta_i             (the holder applies the update)
    x_i     <- w ; x_fetched <- w      (fetch)

Transactions are serialized by the lock, so every pushed update is applied exactly once, to the w that the previous
push left (updates computed from older parameters are applied as they are: DOWNPOUR's staleness). The worker's
optimizer state (momentum) stays local. Buffers are not trained by gradients and summing their moves would
overshoot (BatchNorm's running variance could turn negative), so the holder keeps the floating-point buffers of the
latest pushing worker; integer buffers stay local. A diverged worker (non-finite recent loss or weights) pushes
nothing and is reset to w with fresh optimizer state.

Communicated per round: w read and written back plus nothing else, 2 · 4·d bytes for float32 (d = floating-point
parameters and buffers), through the store served by the rank-0 process: 8·d / tau bytes per step. With ``tau=1``
this is the classic DOWNPOUR (push every step); the LSGD paper uses the same tau as for the other methods.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor
from typing_extensions import override

from ..core.rules import downpour_push
from .asynchronous import AsynchronousStrategy
from .checkpoints import restored_flats, saved_flats


class DownpourStrategy(AsynchronousStrategy):
    """DOWNPOUR: every ``tau`` of its own steps, a worker pushes its accumulated update to the parameter holder and
    fetches the holder's parameters.

    Args:
        tau: a worker's optimizer steps between its pushes (>= 1).
        **kwargs: :class:`~.base.ReplicaStrategy`'s ``eval_on`` (evaluate the held parameters, or ``"local"``),
            ``final_sync``, ``bucket_cap_mb``, ``timeout``, ``start_method`` and Lightning's process arguments.

    Registered as ``"downpour"`` (subprocess launcher) and ``"downpour_spawn"`` (spawn launcher).
    """

    strategy_name: ClassVar[str] = "downpour"
    reference_name: ClassVar[str] = "parameters"
    shared_name: ClassVar[str] = "parameters"

    def __init__(self, tau: int = 16, **kwargs: Any) -> None:
        super().__init__(tau=tau, **kwargs)
        self._fetched: list[Tensor] = []  # per floating bucket: the parameters as last fetched from the holder
        self._is_parameter: list[Tensor] = []  # per floating bucket: True where an element is a parameter

    @override
    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        assert self.lightning_module is not None
        self._is_parameter = self.layout.parameter_masks(self.lightning_module)

    @override
    def _on_fresh_start(self) -> None:
        self._fetched = self.layout.masters()

    @override
    def _communication_round(self) -> dict[str, float]:
        own = self.layout.masters()

        def push(own: list[Tensor], held: list[Tensor]) -> list[Tensor]:
            return [downpour_push(w, x, f, m) for w, x, f, m in zip(held, own, self._fetched, self._is_parameter)]

        diverged, held = self._transact(push)
        metrics: dict[str, float] = {}
        if not diverged:
            pushed = [(x - f)[m] for x, f, m in zip(own, self._fetched, self._is_parameter)]
            metrics["downpour/update_norm"] = math.sqrt(sum(float(d.double().square().sum()) for d in pushed))
            for bucket, w in zip(self.layout.floating_buckets, held):
                bucket.unpack(w)
        self._fetched = [w.clone() for w in held]
        return metrics

    @override
    def _extra_state_dict(self) -> dict[str, Any]:
        return {"fetched": saved_flats(self._fetched)}

    @override
    def _load_extra_state_dict(self, state: Mapping[str, Any]) -> None:
        self._fetched = restored_flats(state.get("fetched"), self.layout.floating_buckets, "DOWNPOUR state")
