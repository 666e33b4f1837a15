"""A leader's weights in flight while training goes on: LSGD's overlapped round (``overlap_steps`` > 0).

The round's broadcasts are issued from the training thread as asynchronous collectives (``async_op=True``) on a
process group of their own, so they run in the backend's own machinery (gloo's worker threads, NCCL's stream) while
the next steps compute, and no other thread ever makes a c10d call (NCCL allows none without a global order). Every
rank issues the same operations in the same order: the round's on its group, Lightning's and the user's on theirs.
On CUDA, NCCL's stream waits for the packed snapshot before sending, and :meth:`InFlightRound.wait` makes the
current stream wait for the transfer; the host waits only where the gloo backend requires it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class InFlight:
    """Asynchronous collectives posted from the training thread (``_works``), waited for from it too."""

    _works: list[Any]

    @property
    def arrived(self) -> bool:
        """Whether :meth:`wait` has returned (nothing left in flight)."""
        return not self._works

    def wait(self) -> None:
        """Block until the transfer has arrived (on NCCL a CUDA stream dependency). Raises the transfer's error."""
        works, self._works = self._works, []
        for work in works:
            work.wait()


@dataclass
class InFlightRound(InFlight):
    """An overlapped LSGD round: the leader's weights at the round's step, travelling or arrived.

    Attributes:
        flats: the leader's packed weights (its snapshot on the leader; receive buffers elsewhere, filled once
            arrived), one flat tensor per bucket of the layout.
        leader: the leader's global rank.
        due: the optimizer step after which the pull toward ``flats`` is applied.
        reset: this rank's score was NaN at the round: it takes ``flats`` instead of pulling toward them.
    """

    flats: list[Tensor]
    leader: int
    due: int
    reset: bool
    _works: list[Any] = field(default_factory=list, repr=False)

    @classmethod
    def start(cls, flats: Sequence[Tensor], leader: int, due: int, reset: bool, group: Any) -> InFlightRound:
        """Post the broadcasts of ``flats`` from ``leader`` on ``group`` (every rank of the group calls this)."""
        works = [dist.broadcast(flat, src=leader, group=group, async_op=True) for flat in flats]
        return cls(list(flats), leader, due, reset, works)

    def state_dict(self) -> dict[str, Any]:
        """The arrived round, on CPU, for a checkpoint shard (waits for the transfer first)."""
        self.wait()
        return {
            "flats": [flat.detach().cpu() for flat in self.flats],
            "leader": self.leader,
            "due": self.due,
            "reset": self.reset,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], devices: Sequence[torch.device]) -> InFlightRound:
        """An arrived round restored from :meth:`state_dict` (``devices``: one per flat, the layout's buckets)."""
        flats = [flat.to(device) for flat, device in zip(state["flats"], devices)]
        return cls(flats, int(state["leader"]), int(state["due"]), bool(state["reset"]))
