"""Leader SGD (Teng et al., NeurIPS 2019, arXiv:1905.10395) as a Lightning strategy.

Each worker i trains its own replica x_i with its own optimizer on its own data shard. Its *score* is the mean of
its last ``leader_window`` training losses (+inf if non-finite). After every ``tau``-th optimizer step:

1. all workers all-gather their scores (P floats) and elect the leader l = argmin score (ties: lowest rank);
2. the leader broadcasts its parameters and floating-point buffers as flat buffers (d values);
3. every other worker pulls toward it, outside the optimizer (momentum never sees the pull)::

       x_i <- x_i - pull_strength * (x_i - x_l)

   integer buffers are copied from the leader, and the leader itself does not move.

Communicated per round, per worker: 4·P bytes of scores plus the model (4·d bytes for float32), so
(4·d + 4·P) / tau bytes per optimizer step on average, against 4·d per step for data-parallel SGD.
If every score is non-finite the round is skipped with a warning.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from .periodic import PeriodicCommunicationStrategy


def elect_leader(scores: Tensor) -> int | None:
    """Index of the lowest finite score (ties: the lowest index), or ``None`` if no score is finite."""
    finite = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, math.inf))
    if not bool(torch.isfinite(finite).any()):
        return None
    return int(torch.argmin(finite))  # argmin returns the first minimal index


class LSGDStrategy(PeriodicCommunicationStrategy):
    """Leader SGD: every ``tau`` steps, pull all workers toward the worker with the lowest recent training loss.

    Args:
        tau: optimizer steps between rounds (>= 1).
        pull_strength: how far each worker moves toward the leader per round, in [0, 1] (λ in the paper;
            0 is independent local SGD, 1 copies the leader).
        leader_window: number of recent training losses averaged into a worker's score (>= 1).
        eval_on: ``"leader"`` (validation/test see the leader's weights on every rank) or ``"local"``.
        final_sync: when ``fit`` ends, every worker takes the leader's weights (a last election).
        bucket_cap_mb: largest flat buffer per collective, in MiB.
        **ddp_kwargs: process-group arguments of Lightning's ``DDPStrategy`` (``start_method``, ``timeout``,
            ``cluster_environment``, ``process_group_backend``, ...).

    Registered as ``"lsgd"`` (subprocess launcher) and ``"lsgd_spawn"`` (spawn launcher).
    """

    strategy_name: ClassVar[str] = "lsgd"
    reference_name: ClassVar[str] = "leader"
    _loss_window_arg: ClassVar[str] = "leader_window"

    def __init__(
        self,
        tau: int = 16,
        pull_strength: float = 0.1,
        leader_window: int = 10,
        eval_on: str = "leader",
        final_sync: bool = True,
        bucket_cap_mb: float = 25.0,
        **ddp_kwargs: Any,
    ) -> None:
        if (
            isinstance(pull_strength, bool)
            or not isinstance(pull_strength, (int, float))
            or not (0.0 <= pull_strength <= 1.0)
        ):
            raise ValueError(f"pull_strength must be a number in [0, 1], got {pull_strength!r}.")
        super().__init__(
            tau=tau,
            eval_on=eval_on,
            final_sync=final_sync,
            loss_window=leader_window,
            bucket_cap_mb=bucket_cap_mb,
            **ddp_kwargs,
        )
        self.pull_strength = float(pull_strength)

    @property
    def leader_window(self) -> int:
        return self.loss_window

    def _elect(self) -> tuple[int | None, Tensor]:
        scores = self.collectives.all_gather(self.local_score().float().reshape(1))
        return elect_leader(scores), scores

    def _broadcast_leader(self, leader: int) -> list[Tensor]:
        """The leader's packed weights on every rank (the leader sends its own)."""
        collectives = self.collectives
        flats = []
        for bucket in self.layout.buckets:
            flat = bucket.pack() if self.global_rank == leader else bucket.empty()
            flats.append(collectives.broadcast(flat, src=leader))
        return flats

    def _communication_round(self) -> dict[str, float] | None:
        leader, scores = self._elect()
        if leader is None:
            rank_zero_warn(f"LSGD round after step {self.steps} skipped: no worker has a finite training loss.")
            return None
        leader_flats = self._broadcast_leader(leader)
        squared_distance = torch.zeros((), dtype=torch.float64, device=self.root_device)
        if self.global_rank != leader:
            for bucket, leader_flat in zip(self.layout.buckets, leader_flats):
                if not bucket.floating:
                    bucket.unpack(leader_flat)
                    continue
                own = bucket.pack()
                toward_leader = leader_flat - own
                squared_distance += toward_leader.double().square().sum()
                bucket.unpack(own.add_(toward_leader, alpha=self.pull_strength))
        return {
            "lsgd/leader": float(leader),
            "lsgd/leader_score": float(scores[leader]),
            "lsgd/dist_to_leader": math.sqrt(float(squared_distance)),
        }

    def _reference_weights(self) -> list[Tensor]:
        leader, _ = self._elect()
        if leader is None:
            rank_zero_warn("No worker has a finite training loss; rank 0 stands in as the leader.")
            leader = 0
        return self._broadcast_leader(leader)
