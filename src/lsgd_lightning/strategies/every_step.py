"""The base of the strategies that communicate after every optimizer step (D-PSGD, D², AD-PSGD, Signum).

These algorithms change the update itself, so on top of :class:`~.base.ReplicaStrategy` they:

- run their exchange right after each local step (automatic and manual optimization alike, never on
  gradient-accumulation micro-batches), seeing the weights from before and after that step;
- check the optimizer when training starts (Lightning's ``setup_optimizers``, before the first step) and refuse what
  the algorithm does not define, with a ``ValueError`` that names the optimizer or setting;
- evaluate on the *workers' average* (no worker holds "the" model): floating-point parameters and buffers averaged
  with one all-reduce, integer buffers (e.g. BatchNorm's ``num_batches_tracked``) the rank's own.

All of them keep, per floating-point bucket of the flat layout, which elements are parameters: the gossip
strategies give parameters the algorithm's update and only average floating-point buffers (e.g. BatchNorm
statistics); Signum evaluates its (identical) parameters with the workers' averaged buffers.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.distributed import _get_default_process_group_backend_for_device
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from .base import ReplicaStrategy
from .checks import check_point_to_point_backend, single_sgd


class EveryStepStrategy(ReplicaStrategy):
    """Base: an exchange after every optimizer step; evaluation, checkpoints' main file and ``final_sync`` use the
    workers' average.

    Before the local step the floating-point state is packed (x_i^t, where the gradient is taken); after it,
    :meth:`_exchange` runs (through the base, which counts and logs the round) and sees both through
    :meth:`_step_views`.

    Args:
        **kwargs: :class:`~.base.ReplicaStrategy`'s (``eval_on``: ``"average"`` or ``"local"``, ``final_sync``,
            ``bucket_cap_mb``, ``timeout``, ``start_method``, Lightning's process arguments).
    """

    reference_name: ClassVar[str] = "average"
    algorithm: ClassVar[str]  # the algorithm's name in messages, e.g. "D-PSGD"
    point_to_point: ClassVar[bool] = False  # exchanges with send/recv (gloo cannot do that with CUDA tensors)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._parameter_masks: list[Tensor] = []  # per floating bucket: True where an element is a parameter
        self._before_step: list[Tensor] | None = None  # the floating buckets before this step's local update

    @abstractmethod
    def _exchange(self) -> dict[str, float] | None:
        """This algorithm's exchange and update after the local step (all ranks call it together); the metrics
        to log, or ``None`` if this rank exchanged nothing this step."""

    @override
    def _configure_launcher(self) -> None:
        if self.point_to_point:
            devices = self.parallel_devices or []
            backend = self._process_group_backend or (
                _get_default_process_group_backend_for_device(devices[0]) if devices else None
            )
            check_point_to_point_backend(type(self).__name__, devices, backend)
        super()._configure_launcher()

    @override
    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        super().setup_optimizers(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            self._check_optimizers(self.optimizers)

    def _check_optimizers(self, optimizers: Sequence[Optimizer]) -> None:
        """Raise ``ValueError`` naming what the algorithm cannot run (called before the first step)."""
        single_sgd(self.algorithm, optimizers)

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        assert self.lightning_module is not None
        self._parameter_masks = self.layout.parameter_masks(self.lightning_module)

    @override
    @contextmanager
    def _local_step(self, optimizer: Optimizer) -> Iterator[None]:
        if self.world_size > 1:  # a single worker never exchanges
            self._before_step = [bucket.pack() for bucket in self.layout.floating_buckets]
        try:
            yield
        finally:
            self._before_step = None

    @override
    def _after_local_step(self) -> None:
        self._run_round(self._exchange)

    @override
    def _reference_weights(self) -> list[Tensor]:
        """The workers' average: floating-point buckets all-reduced and divided by P; integer buckets own."""
        return self._average_weights()

    def _step_views(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per floating bucket: (before, now, payload).

        ``before``: the state before the local step; ``now``: after it; ``payload``: what gossip averages, i.e. the
        parameters from before the step (the gradient was taken there) and the buffers as they are now (the forward
        pass updated them; they get no gradient step).
        """
        assert self._before_step is not None, "the exchange runs only from optimizer_step"
        views = []
        for bucket, before, mask in zip(self.layout.floating_buckets, self._before_step, self._parameter_masks):
            now = bucket.pack()
            views.append((before, now, torch.where(mask, before, now)))
        return views
