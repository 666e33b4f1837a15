"""The common part of the decentralized and sign-vote strategies (D-PSGD, D², AD-PSGD, Signum).

These algorithms communicate after *every* optimizer step and change the update itself, so on top of the shared
periodic base they:

- run their exchange from ``optimizer_step`` right after the local step (automatic and manual optimization alike,
  never on gradient-accumulation micro-batches), instead of the base's every-``tau``-steps schedule;
- check the optimizer when training starts (Lightning's ``setup_optimizers``, before the first step) and refuse what
  the algorithm does not define, with a ``ValueError`` that names the optimizer or setting;
- evaluate on the *workers' average* (no worker holds "the" model): floating-point parameters and buffers averaged
  with one all-reduce, integer buffers (e.g. BatchNorm's ``num_batches_tracked``) the rank's own.

All four keep, per floating-point bucket of the base's flat layout, which elements are parameters: the gossip
strategies give parameters the algorithm's update and only average floating-point buffers (e.g. BatchNorm
statistics); Signum evaluates its (identical) parameters with the workers' averaged buffers.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.optim import Optimizer

from .periodic import PeriodicCommunicationStrategy


class AveragedReplicasStrategy(PeriodicCommunicationStrategy):
    """Base: an exchange after every optimizer step; evaluation, checkpoints' main file and ``final_sync`` use the
    workers' average.

    Args:
        eval_on: ``"average"`` (validation/test/predict see the workers' average on every rank) or ``"local"``.
        final_sync: when ``fit`` ends, every worker takes the workers' average.
        bucket_cap_mb: largest flat buffer per message, in MiB.
        **ddp_kwargs: process-group arguments of Lightning's ``DDPStrategy`` (``start_method``, ``timeout``, ...).
    """

    reference_name: ClassVar[str] = "average"
    algorithm: ClassVar[str]  # the algorithm's name in messages, e.g. "D-PSGD"

    def __init__(
        self, eval_on: str = "average", final_sync: bool = True, bucket_cap_mb: float = 25.0, **ddp_kwargs: Any
    ) -> None:
        super().__init__(tau=1, eval_on=eval_on, final_sync=final_sync, bucket_cap_mb=bucket_cap_mb, **ddp_kwargs)
        self._parameter_masks: list[Tensor] = []  # per floating bucket: True where an element is a parameter

    # The base's every-tau schedule never fires: `optimizer_step` runs the exchange after every step itself.
    def _round_due(self, step: int) -> bool:
        return False

    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        super().setup_optimizers(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            self._check_optimizers(self.optimizers)

    def _check_optimizers(self, optimizers: Sequence[Optimizer]) -> None:
        """Raise ``ValueError`` naming what the algorithm cannot run (called before the first step)."""
        single_sgd(self.algorithm, optimizers)

    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        assert self.lightning_module is not None
        self._parameter_masks = self.layout.parameter_masks(self.lightning_module)

    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        """The local step (Lightning's, through the base: it counts the step), then this algorithm's exchange."""
        with self._local_step(optimizer):
            output = super().optimizer_step(optimizer, closure, model, **kwargs)
        self._after_local_step()
        return output

    def _local_step(self, optimizer: Optimizer) -> AbstractContextManager[None]:
        """Context around the optimizer's step (e.g. remember the weights before it)."""
        return nullcontext()

    @abstractmethod
    def _after_local_step(self) -> None:
        """The algorithm's exchange and update after the local step (all ranks call it together)."""

    def _reference_weights(self) -> list[Tensor]:
        """The workers' average: floating-point buckets all-reduced and divided by P; integer buckets own."""
        collectives = self.collectives
        return [
            collectives.all_reduce_sum(bucket.pack()).div_(self.world_size) if bucket.floating else bucket.pack()
            for bucket in self.layout.buckets
        ]


class GossipStrategy(AveragedReplicasStrategy):
    """Base of D-PSGD, D² and AD-PSGD: remembers the weights the gradient is computed at, then gossips.

    Before the local step the floating-point state is packed (x_i^t, where the gradient is taken); after it,
    :meth:`_communication_round` runs (through the base, which counts and logs the round) and sees both through
    :meth:`_step_views`.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._before_step: list[Tensor] | None = None

    @contextmanager
    def _local_step(self, optimizer: Optimizer) -> Iterator[None]:
        if self.world_size > 1:  # a single worker never gossips
            self._before_step = [bucket.pack() for bucket in self.layout.floating_buckets]
        yield

    def _after_local_step(self) -> None:
        try:
            self._run_round()
        finally:
            self._before_step = None

    def _step_views(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per floating bucket: (before, now, payload).

        ``before``: the state before the local step; ``now``: after it; ``payload``: what gossip averages, i.e. the
        parameters from before the step (the gradient was taken there) and the buffers as they are now (the forward
        pass updated them; they get no gradient step).
        """
        assert self._before_step is not None, "the round runs only from optimizer_step"
        views = []
        for bucket, before, mask in zip(self.layout.floating_buckets, self._before_step, self._parameter_masks):
            now = bucket.pack()
            views.append((before, now, torch.where(mask, before, now)))
        return views


def single_sgd(algorithm: str, optimizers: Sequence[Optimizer]) -> torch.optim.SGD:
    """The one ``torch.optim.SGD`` the algorithm runs with, or a ``ValueError`` naming what was given."""
    if len(optimizers) != 1:
        raise ValueError(
            f"{algorithm} runs with exactly one optimizer (one update rule for the whole model), got "
            f"{len(optimizers)}: {', '.join(type(o).__name__ for o in optimizers) or 'none'}."
        )
    optimizer = optimizers[0]
    if not isinstance(optimizer, torch.optim.SGD):
        raise ValueError(
            f"{algorithm} supports torch.optim.SGD only (its update rule is defined for SGD steps), got "
            f"{type(optimizer).__module__}.{type(optimizer).__name__}. Return torch.optim.SGD from "
            "configure_optimizers."
        )
    return optimizer


def refuse_sgd_setting(
    algorithm: str, optimizer: torch.optim.SGD, name: str, allowed: Callable[[Any], bool], why: str
) -> None:
    """``ValueError`` if any param group's ``name`` is not ``allowed``."""
    for index, group in enumerate(optimizer.param_groups):
        value = group.get(name)
        if not allowed(value):
            raise ValueError(f"{algorithm} does not support SGD {name}={value!r} (param group {index}): {why}")
