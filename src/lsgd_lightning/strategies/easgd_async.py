"""Asynchronous Elastic Averaging SGD (Zhang, Choromanska, LeCun 2015, arXiv:1412.6651, Algorithm 1).

The center variable c lives in one place, rank 0's process, like the paper's parameter server: a parameter holder
(:mod:`~lsgd_lightning.core.holder`, reached by ``torch.distributed.rpc``) under a lock on the job's store
(:class:`~lsgd_lightning.core.board.StoreBoard`). Every worker trains at its own pace; after every ``tau``-th of its
*own* optimizer steps, worker i runs one transaction under the board's lock, with the values it read::

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
parameters and buffers) to and from the rank-0 process (``weight_transport``: by RPC, or as values on the store):
8·d / tau bytes per step, twice the synchronous EASGD's all-reduce payload, with no worker waiting for another.

``momentum_rule="eamsgd"`` is the paper's Algorithm 2 (asynchronous EAMSGD), as the authors' code runs it
(``sixin-zh/mpiT``, ``BiCNN/optim-eamsgd.lua``): the transaction moves x (not the look-ahead x + δv that the model
holds) and the center, and the worker's next gradient is taken at the look-ahead of the x from before the
transaction; see :mod:`.easgd` for the momentum step and what SGD supplies.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor
from typing_extensions import override

from ..core.rules import elastic_alpha, elastic_exchange, squared_distance
from .asynchronous import AsynchronousStrategy
from .checks import check_elastic_rates
from .easgd import ElasticStrategy


class AsyncEASGDStrategy(ElasticStrategy, AsynchronousStrategy):
    """Asynchronous EASGD: each worker, every ``tau`` of its own steps, and the center attract each other.

    Args:
        tau: a worker's optimizer steps between its rounds (>= 1).
        beta: ``alpha = beta / world_size`` unless ``moving_rate`` is given, in (0, 1].
        moving_rate: alpha itself, in (0, 1) (overrides ``beta``).
        momentum_rule: ``"optimizer"`` (the optimizer's own step) or ``"eamsgd"`` (Algorithm 2: the strategy steps
            SGD's Nesterov momentum and the elastic force moves x, not x + δv).
        weight_transport, rpc_options: how the shared weights travel to and from rank 0's process, which holds them
            (``"rpc"``, default, or ``"store"``; see :class:`~.asynchronous.AsynchronousStrategy`).
        **kwargs: :class:`~.base.ReplicaStrategy`'s ``eval_on`` (evaluate the center, or ``"local"``),
            ``final_sync``, ``bucket_cap_mb``, ``timeout``, ``start_method`` and Lightning's process arguments.

    Registered as ``"easgd_async"`` (subprocess launcher) and ``"easgd_async_spawn"`` (spawn launcher).
    """

    strategy_name: ClassVar[str] = "easgd_async"
    reference_name: ClassVar[str] = "center"
    shared_name: ClassVar[str] = "center"

    def __init__(self, tau: int = 16, beta: float = 0.9, moving_rate: float | None = None, **kwargs: Any) -> None:
        self.beta, self.moving_rate = check_elastic_rates(beta, moving_rate)
        super().__init__(tau=tau, **kwargs)

    @property
    def alpha(self) -> float:
        return elastic_alpha(self.beta, self.moving_rate, self.world_size)

    @override
    def _communication_round(self) -> dict[str, float]:
        moved: list[Tensor] = []

        def exchange(own: list[Tensor], center: list[Tensor]) -> list[Tensor]:
            pairs = [elastic_exchange(x, c, self.alpha) for x, c in zip(self._elastic_own(own), center)]
            moved.extend(x for x, _ in pairs)
            return [c for _, c in pairs]

        own = self._elastic_own(self.layout.masters())
        diverged, _ = self._transact(exchange)
        if diverged:
            return {}
        squared = torch.zeros((), dtype=torch.float64, device=self.root_device)
        for x, new in zip(own, moved):
            squared += squared_distance(x, new)  # ||δ|| = alpha ||x - c||
        self._take_elastic(moved)
        return {"easgd/dist_to_center": math.sqrt(float(squared)) / self.alpha}
