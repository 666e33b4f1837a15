"""What the Leader SGD strategies share: the evaluated model is the elected leader, whose weights reach the others.

The leader is the worker with the lowest *score*, the mean of its last ``leader_window`` training losses (Teng et
al., NeurIPS 2019); the election itself is :func:`~lsgd_lightning.core.rules.elect_leader`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor


class LeaderElection:
    """What the Leader SGD strategies (:class:`LSGDStrategy`, :class:`~.lsgd_async.AsyncLSGDStrategy`) share as
    :class:`~.base.ReplicaStrategy` settings: the model evaluated is the elected leader (or the workers' average), and
    the loss window is the ``leader_window`` of the score (the mean of a worker's recent training losses)."""

    reference_name: ClassVar[str] = "leader"
    also_evaluates: ClassVar[tuple[str, ...]] = ("average",)
    _loss_window_arg: ClassVar[str] = "leader_window"
    _without_loss: ClassVar[str] = "this worker's score stays +inf (it cannot be elected)"
    layout: Any  # the ReplicaStrategy's flat layout, collectives and rank
    collectives: Any
    global_rank: int

    def _leader_weights(self, src: int) -> list[Tensor]:
        """The flat buffers that carry ``src``'s weights: its own packed weights on ``src``, empty ones elsewhere."""
        return [bucket.pack() if self.global_rank == src else bucket.empty() for bucket in self.layout.buckets]

    def _leader_flats(self, src: int, group: Any = None, scope: str | None = None) -> list[Tensor]:
        """``src``'s packed weights on every rank of ``group`` (one broadcast per bucket)."""
        return [self.collectives.broadcast(f, src=src, group=group, scope=scope) for f in self._leader_weights(src)]
