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

from .periodic import PeriodicCommunicationStrategy


class EASGDStrategy(PeriodicCommunicationStrategy):
    """Synchronous EASGD: every ``tau`` steps, workers and a shared center variable attract each other.

    Args:
        tau: optimizer steps between rounds (>= 1).
        beta: total elastic strength; ``alpha = beta / world_size`` unless ``moving_rate`` is given. In (0, 1].
        moving_rate: alpha itself (overrides ``beta``); requires 0 < alpha < 1 and world_size * alpha <= 1.
        eval_on: ``"center"`` (validation/test see the center variable on every rank) or ``"local"``.
        final_sync: when ``fit`` ends, every worker takes the center's weights.
        bucket_cap_mb: largest flat buffer per collective, in MiB.
        **ddp_kwargs: process-group arguments of Lightning's ``DDPStrategy``.

    Registered as ``"easgd"`` (subprocess launcher) and ``"easgd_spawn"`` (spawn launcher).
    """

    strategy_name: ClassVar[str] = "easgd"
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
        self._center: list[Tensor] = []  # one flat tensor per floating-point bucket of the layout

    def alpha_for(self, world_size: int) -> float:
        return self.moving_rate if self.moving_rate is not None else self.beta / world_size

    @property
    def alpha(self) -> float:
        return self.alpha_for(self.world_size)

    def _check_world_size(self, world_size: int) -> None:
        alpha = self.alpha_for(world_size)
        if not (0.0 < alpha < 1.0 and world_size * alpha <= 1.0):
            raise ValueError(
                f"EASGD needs 0 < alpha < 1 and 0 < world_size * alpha <= 1 (the center must not overshoot the "
                f"workers' mean); moving_rate={self.moving_rate}, beta={self.beta} give alpha={alpha:g} with "
                f"world_size={world_size} (world_size * alpha = {world_size * alpha:g}). Lower moving_rate, or "
                "leave it None to use beta / world_size."
            )

    def _on_fresh_start(self) -> None:
        self._center = [bucket.pack() for bucket in self.layout.floating_buckets]

    def _extra_state_dict(self) -> dict[str, Any]:
        return {"center": [c.detach().cpu().clone() for c in self._center]}

    def _load_extra_state_dict(self, state: Mapping[str, Any]) -> None:
        buckets = self.layout.floating_buckets
        saved = list(state.get("center", []))
        if len(saved) != len(buckets) or any(c.numel() != b.numel for c, b in zip(saved, buckets)):
            raise RuntimeError("The checkpoint's EASGD center does not match this model's parameters.")
        self._center = [c.to(device=b.device, dtype=b.dtype) for c, b in zip(saved, buckets)]

    def _communication_round(self) -> dict[str, float]:
        alpha, buckets = self.alpha, self.layout.floating_buckets
        diverged = self.is_diverged()
        owns = [bucket.pack() for bucket in buckets]
        # A diverged worker sends NaN, so the sums reveal a divergence without any extra bytes in a healthy round.
        sums = [self._sum_over_workers(own, poisoned=diverged) for own in owns]
        healthy = self.world_size
        if not all(bool(torch.isfinite(total).all()) for total in sums):
            # Rare path: learn who diverged and average over the healthy workers only.
            flags = self.collectives.all_gather(torch.tensor([float(diverged)], device=self.root_device))
            healthy = self.world_size - int(flags.sum())
            if healthy == 0:
                self._raise_all_diverged()
            sums = [self._sum_over_workers(own, poisoned=False, excluded=diverged) for own in owns]
        squared_distance = torch.zeros((), dtype=torch.float64, device=self.root_device)
        for bucket, own, total, center in zip(buckets, owns, sums, self._center):
            toward_center = center - own  # from the values before this round
            if not diverged:
                squared_distance += toward_center.double().square().sum()
            # c <- c + alpha * sum over healthy workers of (x_j - c) = c + n * alpha * (mean - c)
            center.add_(total.div_(healthy) - center, alpha=healthy * alpha)
            if not diverged:
                bucket.unpack(own.add_(toward_center, alpha=alpha))
        if diverged:
            self._reset_to(self._reference_weights(), "center")
            return {}
        return {"easgd/dist_to_center": math.sqrt(float(squared_distance))}

    def _sum_over_workers(self, own: Tensor, poisoned: bool, excluded: bool = False) -> Tensor:
        if poisoned:
            contribution = torch.full_like(own, math.nan)
        elif excluded:
            contribution = torch.zeros_like(own)
        else:
            contribution = own.clone()
        return self.collectives.all_reduce_sum(contribution)

    def _reference_weights(self) -> list[Tensor]:
        # Floating buckets: the center (identical everywhere, nothing to send); integer buckets: the rank's own.
        center = iter(self._center)
        return [next(center).clone() if bucket.floating else bucket.pack() for bucket in self.layout.buckets]


def check_elastic_rates(beta: Any, moving_rate: Any) -> None:
    """``ValueError`` unless 0 < beta <= 1 and moving_rate is None or in (0, 1) (shared by both EASGD forms)."""
    if not _is_number(beta) or not (0.0 < beta <= 1.0):
        raise ValueError(f"beta must be a number in (0, 1] (alpha = beta / world_size), got {beta!r}.")
    if moving_rate is not None and (not _is_number(moving_rate) or not (0.0 < moving_rate < 1.0)):
        raise ValueError(f"moving_rate (alpha) must be a number in (0, 1) or None, got {moving_rate!r}.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
