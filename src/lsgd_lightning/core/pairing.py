"""AD-PSGD's pairs (Lian et al., ICML 2018, arXiv:1710.06952): who may average with whom, the lockstep schedule, and
the rendezvous of a pair on the job's store when there is no global step.

Workers are split into *active* (even ranks) and *passive* (odd ranks) ones; an active only ever averages with a
passive neighbour, so the graph is bipartite and no two workers can wait on each other in a cycle (the paper's
deadlock-free implementation). Neighbours: ``"ring"`` (a - 1 and a + 1; an even number of workers) or
``"complete"`` (every passive).

The asynchronous schedule (:class:`Pairing`) meets pairs through the job's key-value store (the ``TCPStore`` of
the rendezvous). Keys, under a prefix unique to one ``fit``:

- ``q/<p>``: a counter of the requests passive p received; ``q/<p>/<n>``: request n, ``"<active> <its step>"``;
- ``a/<p>/<n>``: the answer, written once by whoever comes first (``compare_set``): the passive's
  ``"<its step> <its serve number> <0|1>"`` (1: taken at a meeting point, between two of its steps), or the active's
  ``withdrawn``, or the passive's ``declined``;
- ``m/<a>``: a counter of the meeting points active a has reached.

Who waits for whom:

- An active, after each of its steps, posts a request to the passive it drew and waits for the answer: until that
  passive reaches its next step boundary (at most one of its steps) or a meeting point, not for anybody else. Once
  any worker asked the job to stop (a SIGTERM, a failure: the health board's stop request), it withdraws a request
  the passive has not taken yet, because the passive may be waiting for everyone at the common stop. While it waits
  it watches its passive as the board's rendezvous does: a failure posted by it, or no training batch started by it
  for ``timeout_s``, ends the wait with an error that names it.
- A passive never waits for an active: at each of its step boundaries it takes the requests that have arrived, in
  arrival order, one at a time, and averages with each (that active is waiting for it, so the exchange completes).
- At a meeting point (evaluation on the workers' average, a checkpoint, a collective of Lightning or a callback, the
  end of training) every worker first *drains*: an active counts the meeting in ``m/<a>``; a passive keeps serving
  requests until every active neighbour has counted it, then everyone meets on the board
  (:meth:`~.board.StoreBoard.rendezvous`). An active reaches a meeting only once its last request was answered, so
  after the drain nothing is pending: a passive that has finished its steps serves the last requests of actives still
  running, and an active that finished had its last request served. A passive that meets *inside* one of its steps (a
  collective in ``training_step``) cannot change its weights there (autograd holds them): it declines instead.

Why this cannot deadlock: an active waits only for a passive; a passive waits for an active only inside an exchange
that active committed to (it holds the answer and is entering the exchange), or in the drain, where it keeps serving.
So the passive an active waits for comes: at its next step boundary, in a drain, or never, when it stops at the
common SIGTERM batch (then a stop was requested: the active withdraws) or fails (the watch names it).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .board import StoreBoard, _Watch
from .collectives import CommMeter
from .flat import to_master
from .gossip import exchange
from .rules import pair_average, squared_distance

AD_PSGD_TOPOLOGIES = ("ring", "complete")
SCHEDULES = ("asynchronous", "lockstep")
WITHDRAWN, DECLINED = "withdrawn", "declined"
_STOP_CHECK_S = 0.05  # how often a waiting active reads the job's stop request


def is_active(rank: int) -> bool:
    """Even ranks are active (they start averagings), odd ranks passive."""
    return rank % 2 == 0


def neighbours(rank: int, world_size: int, topology: str) -> list[int]:
    """The workers of the other role that ``rank`` may pair with, sorted: an active's passive neighbours, or the
    actives that may choose a passive."""
    if topology == "ring":
        return sorted({(rank - 1) % world_size, (rank + 1) % world_size} - {rank})
    if topology == "complete":
        return list(range(1 if is_active(rank) else 0, world_size, 2))
    raise ValueError(f"AD-PSGD topology must be one of {AD_PSGD_TOPOLOGIES}, got {topology!r}.")


def passive_neighbours(active: int, world_size: int, topology: str) -> list[int]:
    """The passive workers that active worker ``active`` may choose, sorted."""
    return neighbours(active, world_size, topology)


def check_bipartite(world_size: int, topology: str) -> None:
    """``ValueError`` unless every active worker's neighbours are passive (the graph is bipartite)."""
    if topology not in AD_PSGD_TOPOLOGIES:
        raise ValueError(f"AD-PSGD topology must be one of {AD_PSGD_TOPOLOGIES}, got {topology!r}.")
    if topology == "ring" and world_size > 1 and world_size % 2 == 1:
        raise ValueError(
            f"AD-PSGD's ring needs an even number of workers to be bipartite (even ranks active, odd ranks "
            f"passive), got {world_size}. Use an even number of workers or topology='complete'."
        )


# ------------------------------------------------------------------------------------------------------------------
# The lockstep schedule: one pairing per step, the same on every rank
# ------------------------------------------------------------------------------------------------------------------
def lockstep_pairing(step: int, world_size: int, topology: str, seed: int) -> dict[int, int]:
    """Active rank -> the passive neighbour it averages with after optimizer step ``step`` (1-based).

    Every rank computes the same dictionary: actives in increasing rank order each draw uniformly from their
    passive neighbours with ``random.Random(f"adpsgd:{seed}:{step}")``.
    """
    rng = random.Random(f"adpsgd:{seed}:{step}")
    pairs = {}
    for active in range(0, world_size, 2):
        choices = passive_neighbours(active, world_size, topology)
        if choices:
            pairs[active] = choices[rng.randrange(len(choices))]
    return pairs


def partners_of(rank: int, pairs: dict[int, int]) -> list[int]:
    """Whom ``rank`` averages with in a lockstep step, in the order the averages happen."""
    if is_active(rank):
        return [pairs[rank]] if rank in pairs else []
    return sorted(active for active, passive in pairs.items() if passive == rank)


# ------------------------------------------------------------------------------------------------------------------
# The asynchronous schedule
# ------------------------------------------------------------------------------------------------------------------
class PartnerDraws:
    """An active worker's own partners: ``random.Random(f"adpsgd:{seed}:rank:{rank}")``, one uniform draw from its
    sorted passive neighbours after each of its steps. ``done`` draws are skipped (a resumed run continues the
    stream)."""

    def __init__(self, seed: int, rank: int, neighbours: Sequence[int], done: int = 0) -> None:
        self._rng = random.Random(f"adpsgd:{seed}:rank:{rank}")
        self.neighbours = sorted(neighbours)
        for _ in range(done):
            self.draw()

    def draw(self) -> int:
        return self.neighbours[self._rng.randrange(len(self.neighbours))]


@dataclass(frozen=True)
class Exchange:
    """One pairwise average, as both of its workers know it."""

    active: int
    active_step: int  # the active's optimizer steps when it asked (it averages inside that step)
    passive: int
    passive_step: int  # the passive's optimizer steps when it took the request
    order: int  # the passive's running number of its averages in this fit (1, 2, ...): the order it served them
    between_steps: bool  # taken at a meeting point, between two of the passive's steps (not inside step passive_step)

    def metrics(self) -> dict[str, float]:
        """What the active logs for it."""
        return {
            "adpsgd/peer": float(self.passive),
            "adpsgd/exchanges": 1.0,
            "adpsgd/peer_step": float(self.passive_step),
            "adpsgd/order": float(self.order),
            "adpsgd/peer_between_steps": float(self.between_steps),
        }


class Pairing:
    """The asynchronous pairs of one ``fit`` on the job's store (see the module docstring).

    Args:
        board: the fit's board: its store, rank, world size, health board and timeout; its rendezvous meets everyone.
        topology: ``"ring"`` or ``"complete"``.
    """

    def __init__(self, board: StoreBoard, topology: str) -> None:
        self.board = board
        self.store = dist.PrefixStore("pairs/", board.store)
        self.rank = board.rank
        self.active = is_active(board.rank)
        self.neighbours = neighbours(board.rank, board.world_size, topology)
        self.meetings = 0  # meeting points passed in this fit (the same count on every rank)
        self._taken = 0  # passive: requests read from its queue
        self._served = 0  # passive: averages taken

    # ---------------------------------------------------------------------------------------------- active
    def request(self, passive: int, step: int) -> int:
        """Post a request to ``passive`` (this active is at its step ``step``); returns its slot in the queue."""
        slot = int(self.store.add(f"q/{passive}", 1))
        self.store.set(f"q/{passive}/{slot}", f"{self.rank} {step}")
        return slot

    def answer(self, passive: int, slot: int, step: int) -> Exchange | None:
        """Wait for ``passive`` to take request ``slot``; ``None`` if it was withdrawn (a stop was requested) or
        declined. Raises, naming ``passive``, if it failed or started no batch for ``timeout_s``."""
        key = f"a/{passive}/{slot}"
        watch = _Watch(self.board, f"rank {passive}, its AD-PSGD partner, to take its averaging request")
        pause, next_stop_check = 0.0002, 0.0
        while not self.store.check([key]):
            now = time.monotonic()
            if now >= next_stop_check:
                next_stop_check = now + _STOP_CHECK_S
                if self.board.health.stop_request() is not None:
                    if self.store.compare_set(key, "", WITHDRAWN).decode() == WITHDRAWN:
                        return None
                    break  # the passive took it first: the exchange happens
            watch.check([passive])
            time.sleep(pause)
            pause = min(2 * pause, 0.005)
        value = self.store.get(key).decode()
        if value in (WITHDRAWN, DECLINED):
            return None
        passive_step, order, between = value.split()
        return Exchange(self.rank, step, passive, int(passive_step), int(order), between == "1")

    # ---------------------------------------------------------------------------------------------- passive
    def pending(self, step: int, between_steps: bool) -> Iterator[Exchange]:
        """Take the requests that arrived before this call, in arrival order, one at a time (the next one only when
        the caller asks for it, i.e. after averaging with the previous one). ``step``: this passive's steps."""
        tail = int(self.store.add(f"q/{self.rank}", 0))
        while self._taken < tail:
            self._taken += 1
            active, active_step = self._request(self._taken)
            answer = f"{step} {self._served + 1} {int(between_steps)}"
            if self.store.compare_set(f"a/{self.rank}/{self._taken}", "", answer).decode() == answer:
                self._served += 1
                yield Exchange(active, active_step, self.rank, step, self._served, between_steps)

    def decline_pending(self) -> None:
        """Answer every request that arrived with ``declined`` (unless already withdrawn)."""
        tail = int(self.store.add(f"q/{self.rank}", 0))
        while self._taken < tail:
            self._taken += 1
            self.store.compare_set(f"a/{self.rank}/{self._taken}", "", DECLINED)

    def _request(self, slot: int) -> tuple[int, int]:
        key = f"q/{self.rank}/{slot}"
        watch = _Watch(self.board, "an averaging request that was counted to be posted")
        while not self.store.check([key]):  # the active posts it right after counting it
            watch.check(self.neighbours)
            time.sleep(0.0002)
        active, step = self.store.get(key).decode().split()
        return int(active), int(step)

    # ---------------------------------------------------------------------------------------------- meetings
    def meet(self, what: str, step: int, serve: Callable[[Exchange], None] | None) -> None:
        """Drain, then meet every worker on the board. A passive serves with ``serve`` (its steps: ``step``) while
        its active neighbours arrive, or declines if ``serve`` is ``None``."""
        self.meetings += 1
        if self.active:
            self.store.add(f"m/{self.rank}", 1)
        else:
            self._drain(what, step, serve)
        self.board.rendezvous(what)

    def _drain(self, what: str, step: int, serve: Callable[[Exchange], None] | None) -> None:
        watch = _Watch(self.board, f"its active neighbours to reach {what}")
        pause = 0.0002
        while True:
            behind = [a for a in self.neighbours if int(self.store.add(f"m/{a}", 0)) < self.meetings]
            if serve is None:
                self.decline_pending()
            else:
                for exchange_ in self.pending(step, between_steps=True):
                    serve(exchange_)
            if not behind:  # they posted their last requests before arriving: all answered now
                return
            watch.check(behind)
            time.sleep(pause)
            pause = min(2 * pause, 0.005)


def average_with(
    peer: int, flats: Sequence[Tensor], meter: CommMeter, device: torch.device
) -> tuple[list[Tensor], float]:
    """Swap ``flats`` with ``peer`` bucket by bucket (it calls this at the same time, with its own) and return
    ``(mine + theirs) / 2`` per bucket, averaged in float32 and held in the flats' dtype (bitwise the same on both
    sides), with the distance ``||mine - theirs||`` before averaging."""
    squared = torch.zeros((), dtype=torch.float64, device=device)
    averaged = []
    for index, mine in enumerate(flats):
        theirs = torch.empty_like(mine)
        exchange(meter, device, [(peer, mine)], [(peer, theirs)], tag=index)
        squared += squared_distance(mine, theirs)
        averaged.append(pair_average(to_master(mine), to_master(theirs)).to(mine.dtype))
    return averaged, math.sqrt(float(squared))
