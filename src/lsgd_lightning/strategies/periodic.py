"""The base of the strategies that communicate every ``tau`` optimizer steps (Leader SGD, EASGD, the async forms).

Every worker trains its own replica with its own optimizer on its own data shard; there is no gradient
communication. After every ``tau``-th optimizer step the subclass runs one *communication round*
(:meth:`PeriodicStrategy._communication_round`) that moves the replicas toward a reference model (the leader for
LSGD, the center variable for EASGD). In manual optimization a round due inside ``training_step`` runs once the
step has returned its loss, so the score includes that loss exactly as in automatic optimization.

A new periodic algorithm is one subclass implementing ``_communication_round`` and ``_reference_weights``.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

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
