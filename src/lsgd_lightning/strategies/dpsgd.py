"""D-PSGD, decentralized parallel SGD (Lian et al., NeurIPS 2017, arXiv:1705.09056), as a Lightning strategy.

Every worker i keeps its own replica x_i and, after every optimizer step, averages it with its neighbours in a
fixed (or time-varying) graph instead of all-reducing anything::

    x_i <- sum_j W[i, j] x_j  -  lr * g_i          g_i: the stochastic gradient at x_i from *before* this averaging

W is the mixing matrix of the topology (see ``_gossip``): the default ring gives
``x_i <- (x_{i-1} + x_i + x_{i+1}) / 3 - lr * g_i``; ``topology="exponential"`` averages with one shifting peer,
``(x_i + x_{i - 2^k}) / 2``. The gradient step and the averaging both start from the same x_i, so computing the
gradient never waits for the neighbours (the paper's point).

What is communicated and when: after every optimizer step, each worker sends its floating-point parameters and
buffers (4·d bytes for d float32 values) to each of its out-neighbours, point to point, and receives theirs; no
global collective. Per step and worker: 2 · 4d bytes sent on the ring, 4d with ``"exponential"``. ``comm/bytes``
counts what this worker sends; ``comm/rounds`` counts steps with an exchange.

Optimizers: ``torch.optim.SGD`` only, one optimizer.

- ``momentum=0`` (with or without ``weight_decay``) is exactly the paper's D-PSGD; weight decay is part of g_i,
  i.e. the gradient of the L2-regularized loss at the pre-averaging x_i.
- ``momentum > 0`` (also Nesterov, dampening): *local momentum*. The optimizer's step
  ``delta_i = SGD(x_i, g_i) - x_i`` replaces ``-lr * g_i``: ``x_i <- sum_j W[i, j] x_j + delta_i``. Each worker's
  momentum buffer only ever sees its own gradients, never the averaging (as LSGD and EASGD treat their pulls). This
  is how decentralized SGD is commonly run on deep networks; the paper's analysis covers momentum 0.
- Other optimizers (Adam, ...) are refused with a ``ValueError`` when training starts.

Floating-point buffers (e.g. BatchNorm statistics) are averaged with W like the parameters but take no step;
integer buffers stay local. Evaluation, the checkpoint's main file and ``final_sync`` use the workers' average
(D-PSGD's output in the paper is the average of the workers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from typing_extensions import override

from ..core.flat import to_master
from ..core.gossip import Mixing, gossip
from ..core.rules import squared_distance, with_local_step
from .every_step import EveryStepStrategy


class DPSGDStrategy(EveryStepStrategy):
    """D-PSGD: after every step, average with the neighbours of a gossip graph (point to point), keep the local step.

    Args:
        topology: ``"ring"`` (default: weights 1/3 for self and both ring neighbours), ``"exponential"`` (one
            shifting peer per step, weights 1/2) or a P x P doubly stochastic mixing matrix (nested lists).
        lazy: use (W + I) / 2 (every worker keeps half of its own weights).
        **kwargs: :class:`~.base.ReplicaStrategy`'s ``eval_on`` (evaluate the workers' average, or ``"local"``),
            ``final_sync``, ``bucket_cap_mb``, ``timeout``, ``start_method`` and Lightning's process arguments.

    Registered as ``"dpsgd"`` (subprocess launcher) and ``"dpsgd_spawn"`` (spawn launcher).
    """

    strategy_name: ClassVar[str] = "dpsgd"
    point_to_point: ClassVar[bool] = True
    algorithm: ClassVar[str] = "D-PSGD"

    def __init__(
        self,
        topology: str | Sequence[Sequence[float]] = "ring",
        lazy: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.mixing = Mixing(topology, lazy)

    @override
    def _check_world_size(self, world_size: int) -> None:
        self.mixing.build(world_size)

    @override
    def _exchange(self) -> dict[str, float]:
        """x_i <- sum_j W[i, j] x_j + (x_i after the local step - x_i before it); buffers only averaged."""
        plan = self.mixing.plan(self.global_rank, self.steps)
        squared = torch.zeros((), dtype=torch.float64, device=self.root_device)
        for index, (bucket, (_, now, payload)) in enumerate(zip(self.layout.floating_buckets, self._step_views())):
            mixed = gossip(plan, payload, self.comm, self.root_device, tag=index)
            squared += squared_distance(mixed, payload)
            bucket.unpack(with_local_step(mixed, before=to_master(payload), after=to_master(now)))
        return {f"{self.strategy_name}/mixing_distance": math.sqrt(float(squared))}
