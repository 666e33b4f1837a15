"""AD-PSGD, asynchronous decentralized parallel SGD (Lian et al., ICML 2018, arXiv:1710.06952), as a strategy.

In the paper every worker loops on its own, without any global barrier:

1. read its weights x̂_i and compute a stochastic gradient g_i at x̂_i;
2. meanwhile, average atomically with one randomly chosen neighbour j: ``x_i, x_j <- (x_i + x_j) / 2``;
3. apply the gradient computed at the weights read *before* the averaging: ``x_i <- x_i - lr * g_i``.

Deadlock freedom comes from a bipartite graph: *active* workers (even ranks) start every averaging and choose one
of their *passive* neighbours (odd ranks); passive workers only answer. Two actives never wait on each other.

What this strategy does (torch.distributed on gloo/NCCL has no one-sided, atomic remote read-modify-write, so the
asynchrony is replaced by a deterministic per-step schedule; everything else follows the paper):

- After optimizer step t (1-based), every rank computes the same pairing without communicating: for each active a
  in increasing rank order, a generator seeded with ``("adpsgd", seed, t)`` picks a passive neighbour uniformly
  (:func:`pairing`). Neighbours: ``"ring"`` (a-1 and a+1; needs an even number of workers so the ring is
  bipartite) or ``"complete"`` (every passive; any number of workers >= 2).
- Each active exchanges with its partner: both send their weights, both set ``(x_a + x_p) / 2`` (point to point).
  A passive chosen by several actives serves them one after another in increasing rank order, each averaging
  using its weights as left by the previous one: exactly the serialized, atomic averages of the paper, in a fixed
  order. A passive nobody chose, and an active without a passive neighbour, skip the step's exchange.
- The gradient is taken at the weights from before the averaging and added afterwards:
  ``x_i <- avg_i + delta_i`` with ``delta_i`` the optimizer's step from x̂_i (``-lr * g_i`` for plain SGD).

Consistency given: within a step, exchanges are serialized per passive (atomic pairwise averages); the values a
worker sends are its pre-step weights (actives) or its weights after the earlier averages of that step (passives);
the gradient is never computed at a half-updated model. There is no global barrier: a worker waits only for its
partner(s) of the step, so a slow worker holds up its partners rather than everyone; but there is no staleness
across steps (a true asynchronous run would let fast workers do more steps).

What is communicated and when: after every step, each active sends 4·d bytes (its floating-point parameters and
buffers) to its partner, a passive 4·d bytes per active it serves. ``comm/bytes`` counts what this worker sends;
``comm/rounds`` counts steps in which it exchanged.

Optimizers: ``torch.optim.SGD`` (one optimizer), as D-PSGD: momentum 0 is the paper's AD-PSGD, weight decay is part
of g, momentum/Nesterov act as local momentum (the buffer never sees the averaging). Others are refused when
training starts. Floating-point buffers are averaged, integer buffers stay local. Evaluation, the checkpoint's
main file and ``final_sync`` use the workers' average.
"""

from __future__ import annotations

import math
import random
from typing import Any, ClassVar

import torch
from typing_extensions import override

from ..core.flat import to_master
from ..core.gossip import exchange
from ..core.rules import pair_average, squared_distance, with_local_step
from .every_step import EveryStepStrategy

AD_PSGD_TOPOLOGIES = ("ring", "complete")


def is_active(rank: int) -> bool:
    """Even ranks are active (they start averagings), odd ranks passive."""
    return rank % 2 == 0


def passive_neighbours(active: int, world_size: int, topology: str) -> list[int]:
    """The passive workers that active worker ``active`` may choose, sorted."""
    if topology == "ring":
        return sorted({(active - 1) % world_size, (active + 1) % world_size} - {active})
    if topology == "complete":
        return list(range(1, world_size, 2))
    raise ValueError(f"AD-PSGD topology must be one of {AD_PSGD_TOPOLOGIES}, got {topology!r}.")


def check_bipartite(world_size: int, topology: str) -> None:
    """``ValueError`` unless every active worker's neighbours are passive (the graph is bipartite)."""
    if topology not in AD_PSGD_TOPOLOGIES:
        raise ValueError(f"AD-PSGD topology must be one of {AD_PSGD_TOPOLOGIES}, got {topology!r}.")
    if topology == "ring" and world_size > 1 and world_size % 2 == 1:
        raise ValueError(
            f"AD-PSGD's ring needs an even number of workers to be bipartite (even ranks active, odd ranks "
            f"passive), got {world_size}. Use an even number of workers or topology='complete'."
        )


def pairing(step: int, world_size: int, topology: str, seed: int) -> dict[int, int]:
    """Active rank -> the passive neighbour it averages with after optimizer step ``step`` (1-based).

    Every rank computes the same dictionary: actives in increasing rank order each draw uniformly from their
    passive neighbours with ``random.Random(f"adpsgd:{seed}:{step}")``.
    """
    rng = random.Random(f"adpsgd:{seed}:{step}")
    pairs = {}
    for active in range(0, world_size, 2):
        neighbours = passive_neighbours(active, world_size, topology)
        if neighbours:
            pairs[active] = neighbours[rng.randrange(len(neighbours))]
    return pairs


def partners_of(rank: int, pairs: dict[int, int]) -> list[int]:
    """Whom ``rank`` averages with this step, in the order the averages happen."""
    if is_active(rank):
        return [pairs[rank]] if rank in pairs else []
    return sorted(active for active, passive in pairs.items() if passive == rank)


class ADPSGDStrategy(EveryStepStrategy):
    """AD-PSGD: after every step, pairwise averaging with a random neighbour (active/passive split), keeping the
    local step computed at the weights from before the averaging.

    Args:
        topology: ``"ring"`` (default; even number of workers) or ``"complete"`` (any passive for any active).
        seed: seed of the pairing schedule (the same on every rank).
        **kwargs: :class:`~.base.ReplicaStrategy`'s ``eval_on`` (evaluate the workers' average, or ``"local"``),
            ``final_sync``, ``bucket_cap_mb``, ``timeout``, ``start_method`` and Lightning's process arguments.

    Registered as ``"adpsgd"`` (subprocess launcher) and ``"adpsgd_spawn"`` (spawn launcher).
    """

    strategy_name: ClassVar[str] = "adpsgd"
    point_to_point: ClassVar[bool] = True
    algorithm: ClassVar[str] = "AD-PSGD"

    def __init__(
        self,
        topology: str = "ring",
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if topology not in AD_PSGD_TOPOLOGIES:
            raise ValueError(f"AD-PSGD topology must be one of {AD_PSGD_TOPOLOGIES}, got {topology!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}.")
        super().__init__(**kwargs)
        self.topology = topology
        self.seed = seed

    @override
    def _check_world_size(self, world_size: int) -> None:
        check_bipartite(world_size, self.topology)

    @override
    def _exchange(self) -> dict[str, float] | None:
        partners = partners_of(self.global_rank, pairing(self.steps, self.world_size, self.topology, self.seed))
        if not partners:
            return None  # nobody to average with this step: the local step stands
        squared = torch.zeros((), dtype=torch.float64, device=self.root_device)
        for index, (bucket, (_, now, payload)) in enumerate(zip(self.layout.floating_buckets, self._step_views())):
            current = payload
            for position, peer in enumerate(partners):
                theirs = torch.empty_like(current)
                exchange(self.comm, self.root_device, [(peer, current)], [(peer, theirs)], tag=index)
                if position == 0:
                    squared += squared_distance(current, theirs)
                # averaged in float32, held (and sent on) in the model's dtype, as the partner's own weights are
                current = pair_average(to_master(current), to_master(theirs)).to(payload.dtype)
            bucket.unpack(with_local_step(to_master(current), before=to_master(payload), after=to_master(now)))
        return {
            "adpsgd/peer": float(partners[0]),
            "adpsgd/exchanges": float(len(partners)),
            "adpsgd/dist_to_peer": math.sqrt(float(squared)),
        }
