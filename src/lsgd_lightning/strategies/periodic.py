"""The base of the strategies that communicate every ``tau`` optimizer steps (Leader SGD, EASGD, the async forms).

Every worker trains its own replica with its own optimizer on its own data shard; there is no gradient
communication. After every ``tau``-th optimizer step the subclass runs one *communication round*
(:meth:`PeriodicStrategy._communication_round`) that moves the replicas toward a reference model (the leader for
LSGD, the center variable for EASGD). In manual optimization a round due inside ``training_step`` runs once the
step has returned its loss, so the score includes that loss exactly as in automatic optimization.

A new periodic algorithm is one subclass implementing ``_communication_round`` and ``_reference_weights``.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from .base import ReplicaStrategy
from .checks import check_int


class PeriodicStrategy(ReplicaStrategy):
    """Local SGD on every worker plus a communication round every ``tau`` optimizer steps.

    Args:
        tau: optimizer steps between communication rounds (>= 1).
        **kwargs: :class:`~.base.ReplicaStrategy` arguments (``eval_on``, ``final_sync``, ``loss_window``,
            ``bucket_cap_mb``) and Lightning's process-group arguments.
    """

    def __init__(self, tau: int = 16, **kwargs: Any) -> None:
        check_int("tau", tau, minimum=1)
        super().__init__(**kwargs)
        self.tau = tau
        self._pending_rounds = 0  # rounds due during a manual-optimization training_step

    @abstractmethod
    def _communication_round(self) -> dict[str, float] | None:
        """Run one round on every rank (a collective: all ranks call it together).

        Returns the metrics to log, or ``None`` if the round was skipped (it then does not count as a round).
        """

    def _round_due(self, step: int) -> bool:
        """Whether a communication round follows optimizer step ``step`` (1-based)."""
        return step % self.tau == 0

    @override
    def _after_local_step(self) -> None:
        if not self._round_due(self._steps):
            return
        assert self.lightning_module is not None
        if self.lightning_module.automatic_optimization:
            self._run_round(self._communication_round)
        else:
            self._pending_rounds += 1

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        output = super().training_step(*args, **kwargs)
        # Manual optimization stepped inside training_step, before the loss was returned: run the due rounds now.
        self._run_pending_rounds()
        return output

    def _run_pending_rounds(self) -> None:
        while self._pending_rounds > 0:
            self._pending_rounds -= 1
            self._run_round(self._communication_round)

    @override
    def setup(self, trainer: Any) -> None:
        self._pending_rounds = 0
        super().setup(trainer)

    def _sum_over_healthy(self, contributions: list[Tensor], diverged: bool) -> tuple[list[Tensor], int]:
        """Σ over the healthy workers of each of ``contributions`` (one all-reduce each) and how many they are.

        A diverged worker sends NaN, so the sums reveal a divergence without any extra bytes in a healthy round;
        otherwise every rank learns who diverged (an all-gather of P floats) and the sums are taken again without
        them. Raises if every worker diverged.
        """
        sums = [self._sum_one(c, poisoned=diverged) for c in contributions]
        if all(bool(torch.isfinite(total).all()) for total in sums):
            return sums, self.world_size
        flags = self.collectives.all_gather(torch.tensor([float(diverged)], device=self.root_device))
        healthy = self.world_size - int(flags.sum())
        if healthy == 0:
            self._raise_all_diverged()
        return [self._sum_one(c, poisoned=False, excluded=diverged) for c in contributions], healthy

    def _sum_one(self, contribution: Tensor, poisoned: bool, excluded: bool = False) -> Tensor:
        if poisoned:
            contribution = torch.full_like(contribution, math.nan)
        elif excluded:
            contribution = torch.zeros_like(contribution)
        else:
            contribution = contribution.clone()
        return self.collectives.all_reduce_sum(contribution)
