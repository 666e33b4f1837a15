"""Asynchronous Elastic Averaging SGD (Zhang, Choromanska, LeCun 2015, arXiv:1412.6651, Algorithm 1).

The center variable c lives in one place, the job's store (:class:`~._board.StoreBoard`), like the paper's parameter
server. Every worker trains at its own pace; after every ``tau``-th of its *own* optimizer steps, worker i runs one
transaction under the board's lock, with the values it read::

    read c
    delta = alpha * (x_i - c)
    c   <- c + delta          (written back before the lock is released)
    x_i <- x_i - delta        (after the lock, outside the optimizer: momentum never sees the elastic term)

Transactions are serialized by the lock, so no update of c is ever lost and each uses the c that the previous one
left. Floating-point parameters and buffers (BatchNorm statistics) are tied to the center; integer buffers stay
local. A diverged worker (non-finite recent loss or weights) does not touch c: it is reset to c with fresh optimizer
state, so the center stays finite.

Stability: 0 < alpha < 1 (each transaction moves x_i and c toward each other by the fraction alpha). The default is
the paper's alpha = beta / P with beta = 0.9; in the asynchronous form nothing forces P·alpha <= 1, since the
workers' moves of c are sequential, not summed in one step.

Communicated per round: the center read and written back, 2 · 4·d bytes for float32 (d = floating-point
parameters and buffers) through the store served by the rank-0 process: 8·d / tau bytes per step, twice the
synchronous EASGD's all-reduce payload, with no worker waiting for another.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from ._asynchronous import AsynchronousStrategy
from .easgd import check_elastic_rates


class AsyncEASGDStrategy(AsynchronousStrategy):
    """Asynchronous EASGD: each worker, every ``tau`` of its own steps, and the center attract each other.

    Args:
        tau: a worker's optimizer steps between its rounds (>= 1).
        beta: ``alpha = beta / world_size`` unless ``moving_rate`` is given, in (0, 1].
        moving_rate: alpha itself, in (0, 1) (overrides ``beta``).
        eval_on: ``"center"`` (validation/test see the center on every rank) or ``"local"``.
        final_sync: when ``fit`` ends, every worker takes the center.
        bucket_cap_mb: largest flat buffer per transfer unit, in MiB.
        **ddp_kwargs: process-group arguments of Lightning's ``DDPStrategy``.

    Registered as ``"easgd_async"`` (subprocess launcher) and ``"easgd_async_spawn"`` (spawn launcher).
    """

    strategy_name: ClassVar[str] = "easgd_async"
    reference_name: ClassVar[str] = "center"

    def __init__(
        self,
        tau: int = 16,
        beta: float = 0.9,
        moving_rate: float | None = None,
        eval_on: str = "center",
        final_sync: bool = True,
        bucket_cap_mb: float = 25.0,
        **ddp_kwargs: Any,
    ) -> None:
        check_elastic_rates(beta, moving_rate)
        super().__init__(tau=tau, eval_on=eval_on, final_sync=final_sync, bucket_cap_mb=bucket_cap_mb, **ddp_kwargs)
        self.beta = float(beta)
        self.moving_rate = None if moving_rate is None else float(moving_rate)

    @property
    def alpha(self) -> float:
        return self.moving_rate if self.moving_rate is not None else self.beta / self.world_size

    def _publish_initial(self, resumed_reference: list[Tensor] | None) -> None:
        self.board.put("center", self._floating(resumed_reference or self.layout.pack()))

    def _communication_round(self) -> dict[str, float]:
        diverged = self.is_diverged()
        buckets = self.layout.floating_buckets
        own = [bucket.pack() for bucket in buckets]
        with self.board.locked():
            center = self.board.get("center", like=own)
            if not diverged:
                deltas = [(x - c).mul_(self.alpha) for x, c in zip(own, center)]
                self.board.put("center", [c + d for c, d in zip(center, deltas)])
        if diverged:
            self._reset_to(self._with_own_integers(center), "center")
            return {}
        squared = torch.zeros((), dtype=torch.float64, device=self.root_device)
        for bucket, x, delta in zip(buckets, own, deltas):
            squared += delta.double().square().sum()
            bucket.unpack(x.sub_(delta))
        return {"easgd/dist_to_center": math.sqrt(float(squared)) / self.alpha}

    def _reference_weights(self) -> list[Tensor]:
        like = [bucket.pack() for bucket in self.layout.floating_buckets]
        with self.board.locked():
            return self._with_own_integers(self.board.get("center", like=like))
