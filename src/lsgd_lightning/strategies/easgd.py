"""Synchronous Elastic Averaging SGD (Zhang, Choromanska, LeCun 2015, arXiv:1412.6651) as a Lightning strategy.

Workers x_1..x_P are tied to a *center variable* c by an elastic force of strength alpha. After every ``tau``-th
optimizer step, using the values from before the round::

    x_bar <- (1/P) Σ_j x_j                                (one all-reduce of the flat parameters)
    x_i   <- x_i - alpha * (x_i - c)
    c     <- c + P * alpha * (x_bar - c)          (= c + alpha Σ_j (x_j - c))

The center starts at the (identical) initial weights and is kept on every worker: every worker applies the same
update to its copy, so the copies stay identical and the center itself is never sent. Communicated per round and
worker: one all-reduce of the floating-point parameters and buffers, 4·d bytes for float32, i.e. 4·d / tau per step.
Integer buffers stay local. The elastic term is applied outside the optimizer, so with SGD + momentum/Nesterov
(EAMSGD) the momentum never sees it.

The rule itself is :func:`~lsgd_lightning.core.rules.elastic_round`.

Stability: the worker update contracts toward the center only for 0 < alpha < 1, and the center moves a fraction
P·alpha of the way to the workers' mean, which must not overshoot it: 0 < P·alpha <= 1. Both are enforced
(the paper's choice alpha = beta / P with beta = 0.9 satisfies them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor
from typing_extensions import override

from ..core.rules import elastic_alpha, elastic_round, squared_distance
from .checkpoints import restored_flats, saved_flats
from .checks import check_elastic_rates
from .periodic import PeriodicStrategy


class EASGDStrategy(PeriodicStrategy):
    """Synchronous EASGD: every ``tau`` steps, workers and a shared center variable attract each other.

    Args:
        tau: optimizer steps between rounds (>= 1).
        beta: total elastic strength; ``alpha = beta / world_size`` unless ``moving_rate`` is given. In (0, 1].
        moving_rate: alpha itself (overrides ``beta``); requires 0 < alpha < 1 and world_size * alpha <= 1.
        **kwargs: :class:`~.base.ReplicaStrategy`'s ``eval_on`` (evaluate the center, or ``"local"``),
            ``final_sync``, ``bucket_cap_mb``, ``timeout``, ``start_method`` and Lightning's process arguments.

    Registered as ``"easgd"`` (subprocess launcher) and ``"easgd_spawn"`` (spawn launcher).
    """

    strategy_name: ClassVar[str] = "easgd"
    reference_name: ClassVar[str] = "center"

    def __init__(self, tau: int = 16, beta: float = 0.9, moving_rate: float | None = None, **kwargs: Any) -> None:
        self.beta, self.moving_rate = check_elastic_rates(beta, moving_rate)
        super().__init__(tau=tau, **kwargs)
        self._center: list[Tensor] = []  # one flat tensor per floating-point bucket of the layout

    def alpha_for(self, world_size: int) -> float:
        return elastic_alpha(self.beta, self.moving_rate, world_size)

    @property
    def alpha(self) -> float:
        return self.alpha_for(self.world_size)

    @override
    def _check_world_size(self, world_size: int) -> None:
        alpha = self.alpha_for(world_size)
        if not (0.0 < alpha < 1.0 and world_size * alpha <= 1.0):
            raise ValueError(
                f"EASGD needs 0 < alpha < 1 and 0 < world_size * alpha <= 1 (the center must not overshoot the "
                f"workers' mean); moving_rate={self.moving_rate}, beta={self.beta} give alpha={alpha:g} with "
                f"world_size={world_size} (world_size * alpha = {world_size * alpha:g}). Lower moving_rate, or "
                "leave it None to use beta / world_size."
            )

    @override
    def _on_fresh_start(self) -> None:
        self._center = self.layout.masters()  # float32 for a half-precision model: small moves accumulate

    @override
    def _extra_state_dict(self) -> dict[str, Any]:
        return {"center": saved_flats(self._center)}

    @override
    def _load_extra_state_dict(self, state: Mapping[str, Any]) -> None:
        self._center = restored_flats(state.get("center"), self.layout.floating_buckets, "EASGD center")

    @override
    def _communication_round(self) -> dict[str, float]:
        alpha, buckets = self.alpha, self.layout.floating_buckets
        diverged = self.is_diverged()
        owns = self.layout.masters()  # the sum travels in float32 for a half-precision model
        sums, healthy = self._sum_over_healthy(owns, diverged)  # a diverged worker is left out
        squared = torch.zeros((), dtype=torch.float64, device=self.root_device)
        for index, (bucket, own, total) in enumerate(zip(buckets, owns, sums)):
            if not diverged:
                squared += squared_distance(own, self._center[index])
            moved, self._center[index] = elastic_round(own, self._center[index], total, healthy, alpha)
            if not diverged:
                bucket.unpack(moved)
        if diverged:
            self._reset_to(self._reference_weights(), "center")
            return {}
        return {"easgd/dist_to_center": math.sqrt(float(squared))}

    @override
    def _reference_weights(self) -> list[Tensor]:
        # Floating buckets: the center (identical everywhere, nothing to send); integer buckets: the rank's own.
        center = iter(self._center)
        return [next(center).to(bucket.dtype) if bucket.floating else bucket.pack() for bucket in self.layout.buckets]
