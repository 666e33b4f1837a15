"""AD-PSGD, asynchronous decentralized parallel SGD (Lian et al., ICML 2018, arXiv:1710.06952), as a strategy.

In the paper every worker loops on its own, without any global step:

1. read its weights x̂_i and compute a stochastic gradient g_i at x̂_i;
2. meanwhile, average atomically with one randomly chosen neighbour j: ``x_i, x_j <- (x_i + x_j) / 2``;
3. apply the gradient computed at the weights read *before* the averaging: ``x_i <- x_i - lr * g_i``.

Deadlock freedom comes from a bipartite graph: *active* workers (even ranks) start every averaging with one of their
*passive* neighbours (odd ranks); passives only answer. Neighbours: ``"ring"`` (a-1 and a+1; an even number of
workers) or ``"complete"`` (every passive; any number >= 2). Two schedules (``schedule=``):

- ``"asynchronous"`` (default, the paper's): after each of its optimizer steps an active draws a passive neighbour
  from its own generator (:class:`~lsgd_lightning.core.pairing.PartnerDraws`, seeded from ``seed`` and its rank),
  asks it through the job's store and waits for it to take the request: at its next step boundary (at most one of
  its steps) or at a meeting point; nobody else. A passive, at each of its step boundaries, serves the requests that
  have arrived, in arrival order, and otherwise trains on. No collective over all workers runs during training;
  workers meet (draining their requests first) only where Lightning needs it: evaluation on the workers' average,
  checkpoints, collectives of Lightning or a callback, the end of training. The protocol, and why it cannot
  deadlock, is in :mod:`lsgd_lightning.core.pairing`. Every exchange is logged (``adpsgd/peer``, ``adpsgd/peer_step``,
  ``adpsgd/order``, ``adpsgd/peer_between_steps``) and kept in :attr:`ADPSGDStrategy.exchanges`.
- ``"lockstep"`` (the package's deterministic variant): after step t every rank computes the same pairing
  (:func:`~lsgd_lightning.core.pairing.lockstep_pairing`, seeded with ``("adpsgd", seed, t)``); a passive chosen by
  several actives serves them in rank order. Reproducible bit for bit, but a worker waits for its partners of every
  step, so a slow worker holds up its partners, and theirs in turn.

In both, an average uses what the paper's step 2 sees: each side's parameters from before its local step (where its
gradient was taken) and its buffers as they are; the local step is added afterwards, ``x_i <- avg_i + delta_i``
(``delta_i`` = the optimizer's step from x̂_i). A passive averaging at a meeting point, between two of its steps,
sends its weights as they are. Averages of one passive are serialized (atomic, as in the paper).

Staleness (asynchronous schedule). In the paper x̂_i may be stale: other workers' averages can change x_i while
worker i computes its gradient, and the analysis allows x̂_i up to T iterations old. Here an active's weights change
only in its own average, once per step after its gradient, so an active's gradient is taken at its current weights.
A passive's gradient is taken at its weights x̂_p from the start of its step; the averages it serves at the end of
that step (the requests that arrived meanwhile: at most one per active neighbour, i.e. 2 on the ring and
ceil(P/2) on the complete graph) are applied before its step is added, so its gradient is stale by that many
averages, as the paper allows. An active averages with the passive's x̂_p: the passive's weights without the step it
is computing, as a read of x_p during the passive's computation sees them in the paper.

Deviation from the paper, and why. The paper's workers answer averaging requests from a communication thread while
they compute, so nobody waits for anybody's computation. Here every exchange runs on the training thread (NCCL
communicators must not be driven from several threads), so a passive answers at its step boundaries and an active
waits for the passive it drew to reach one: at most one of that passive's steps. A slow passive therefore slows
down the actives that draw it, while they are paired with it (with 2 workers, always); a worker never waits for a
worker that is not its partner of the moment, and never for the slowest worker of the job.

``comm/bytes`` counts what this worker sends: 4·d per average (floating-point parameters and buffers).
Optimizers: ``torch.optim.SGD`` (one), as D-PSGD: momentum 0 is the paper's AD-PSGD, weight decay is part of g,
momentum/Nesterov act as local momentum. Evaluation, the checkpoint's main file and ``final_sync`` use the workers'
average.
"""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from typing_extensions import override

from ..core.flat import to_master
from ..core.gossip import exchange
from ..core.pairing import (
    AD_PSGD_TOPOLOGIES,
    Exchange,
    Pairing,
    PartnerDraws,
    average_with,
    check_bipartite,
    is_active,
    lockstep_pairing,
    partners_of,
    passive_neighbours,
)
from ..core.rules import pair_average, squared_distance, with_local_step
from .checks import check_adpsgd_options
from .every_step import EveryStepStrategy
from .meetings import MeetingPoints

pairing = lockstep_pairing  # the lockstep schedule under its historical name
__all__ = ["AD_PSGD_TOPOLOGIES", "ADPSGDStrategy", "is_active", "pairing", "partners_of", "passive_neighbours"]


class ADPSGDStrategy(MeetingPoints, EveryStepStrategy):
    """AD-PSGD: pairwise averaging with a random neighbour (active/passive split), keeping the local step computed at
    the weights from before the averaging.

    Args:
        topology: ``"ring"`` (default; even number of workers) or ``"complete"`` (any passive for any active).
        seed: seed of the partners' draws (the same on every rank).
        schedule: ``"asynchronous"`` (default: the paper's, no global step) or ``"lockstep"`` (deterministic).
        **kwargs: :class:`~.base.ReplicaStrategy`'s ``eval_on`` (evaluate the workers' average, or ``"local"``),
            ``final_sync``, ``bucket_cap_mb``, ``timeout``, ``start_method`` and Lightning's process arguments.

    Registered as ``"adpsgd"`` (subprocess launcher) and ``"adpsgd_spawn"`` (spawn launcher).
    """

    strategy_name: ClassVar[str] = "adpsgd"
    point_to_point: ClassVar[bool] = True
    algorithm: ClassVar[str] = "AD-PSGD"

    def __init__(self, topology: str = "ring", seed: int = 0, schedule: str = "asynchronous", **kwargs: Any) -> None:
        check_adpsgd_options(topology, seed, schedule)
        super().__init__(**kwargs)
        self.topology = topology
        self.seed = seed
        self.schedule = schedule
        self.exchanges: list[Exchange] = []  # asynchronous: every average this worker took part in (this fit)
        self.withdrawn = 0  # asynchronous, active: requests given up because the job was stopping (this fit)
        self._pairs: Pairing | None = None  # asynchronous, while fitting with several workers
        self._draws: PartnerDraws | None = None
        self._in_training_step = 0

    @override
    def _check_world_size(self, world_size: int) -> None:
        check_bipartite(world_size, self.topology)

    @property
    def pairs(self) -> Pairing:
        if self._pairs is None:
            raise RuntimeError("ADPSGDStrategy: the asynchronous pairs exist only while fitting with several workers.")
        return self._pairs

    # ------------------------------------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if self.schedule != "asynchronous" or trainer.state.fn != TrainerFn.FITTING or self.world_size == 1:
            return
        self._pairs = Pairing(self._open_board("adpsgd"), self.topology)
        if self._pairs.active:  # a resumed worker continues its stream of draws (one per step)
            self._draws = PartnerDraws(self.seed, self.global_rank, self._pairs.neighbours, done=self._steps)
        self.exchanges, self.withdrawn = [], 0
        self._guard.install()

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self._in_training_step += 1  # a meeting in here must not change the weights (autograd holds them)
        try:
            return super().training_step(*args, **kwargs)
        finally:
            self._in_training_step -= 1

    @override
    def _meet(self, what: str) -> None:
        """Everyone at one point: drain the requests (a passive serves them with its weights as they are, or
        declines them inside one of its steps), then the board's rendezvous."""
        inside_step = self._in_training_step > 0 or self._before_step is not None
        self.pairs.meet(what, self.steps, None if inside_step else self._serve_between_steps)

    @override
    def teardown(self) -> None:
        self._pairs = None
        super().teardown()

    # ------------------------------------------------------------------------------------------------ exchanges
    @override
    def _exchange(self) -> dict[str, float] | None:
        if self.schedule == "lockstep":
            return self._lockstep_exchange()
        return self._request_average() if self.pairs.active else self._serve_requests()

    def _request_average(self) -> dict[str, float] | None:
        """Active, after its step: draw a partner, ask it, average once it takes the request."""
        assert self._draws is not None
        peer = self._draws.draw()
        started = time.perf_counter()
        answer = self.pairs.answer(peer, self.pairs.request(peer, self.steps), self.steps)
        waited = time.perf_counter() - started
        if answer is None:
            self.withdrawn += 1
            return None  # the job is stopping: the local step stands
        views = self._step_views()
        averaged, distance = average_with(peer, [payload for _, _, payload in views], self.comm, self.root_device)
        self._add_local_step(averaged, views)
        self.exchanges.append(answer)
        return {
            **answer.metrics(),
            "adpsgd/dist_to_peer": distance,
            "adpsgd/wait_s": waited,
            "adpsgd/withdrawn": float(self.withdrawn),
        }

    def _serve_requests(self) -> dict[str, float] | None:
        """Passive, after its step: average with every active that asked so far, one after another."""
        views = self._step_views()
        current = [payload for _, _, payload in views]
        served, first_distance = [], 0.0
        for answer in self.pairs.pending(self.steps, between_steps=False):
            current, distance = average_with(answer.active, current, self.comm, self.root_device)
            first_distance = distance if not served else first_distance
            served.append(answer)
        if not served:
            return None  # nobody asked: the local step stands
        self._add_local_step(current, views)
        self.exchanges += served
        return {
            "adpsgd/peer": float(served[0].active),
            "adpsgd/exchanges": float(len(served)),
            "adpsgd/order": float(served[0].order),
            "adpsgd/dist_to_peer": first_distance,
        }

    def _serve_between_steps(self, answer: Exchange) -> None:
        """Passive at a meeting point: average with its weights as they are (no step in progress)."""
        buckets = self.layout.floating_buckets
        averaged, _ = average_with(answer.active, [b.pack() for b in buckets], self.comm, self.root_device)
        for bucket, flat in zip(buckets, averaged):
            bucket.unpack(flat)
        self.exchanges.append(answer)

    def _add_local_step(self, averaged: list[Tensor], views: list[tuple[Tensor, Tensor, Tensor]]) -> None:
        """x <- average + (x_after_step - x_before_step), per floating bucket."""
        for bucket, mixed, (_, now, payload) in zip(self.layout.floating_buckets, averaged, views):
            bucket.unpack(with_local_step(to_master(mixed), before=to_master(payload), after=to_master(now)))

    def _lockstep_exchange(self) -> dict[str, float] | None:
        pairs = lockstep_pairing(self.steps, self.world_size, self.topology, self.seed)
        partners = partners_of(self.global_rank, pairs)
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
