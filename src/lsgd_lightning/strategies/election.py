"""What the Leader SGD strategies share as settings of the replica base: the evaluated model is the elected leader.

The leader is the worker with the lowest *score*, the mean of its last ``leader_window`` training losses (Teng et
al., NeurIPS 2019); the election itself is :func:`~lsgd_lightning.core.rules.elect_leader`.
"""

from __future__ import annotations

from typing import ClassVar


class LeaderElection:
    """What the Leader SGD strategies (:class:`LSGDStrategy`, :class:`~.lsgd_async.AsyncLSGDStrategy`) share as
    :class:`~.base.ReplicaStrategy` settings: the model evaluated is the elected leader (or the workers' average), and
    the loss window is the ``leader_window`` of the score (the mean of a worker's recent training losses)."""

    reference_name: ClassVar[str] = "leader"
    also_evaluates: ClassVar[tuple[str, ...]] = ("average",)
    _loss_window_arg: ClassVar[str] = "leader_window"
    _without_loss: ClassVar[str] = "this worker's score stays +inf (it cannot be elected)"
