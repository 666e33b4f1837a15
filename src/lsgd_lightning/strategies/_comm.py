"""Accounted collectives: every strategy reports the same ``comm/*`` numbers, measured the same way.

``comm/bytes`` is the payload a rank hands to collectives (the size of the buffer it sends or receives into),
``comm/seconds`` the wall time spent inside them, and ``comm/rounds`` the number of communication rounds.
On CUDA the timer synchronizes the device so that the time of the (asynchronous) NCCL kernel is included.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

# ``all_gather_into_tensor`` was renamed ``all_gather_single`` in recent torch; the old name warns there.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def payload_bytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@dataclass
class CommMeter:
    """Cumulative communication counters of one rank."""

    bytes: int = 0
    seconds: float = 0.0
    rounds: int = 0

    def metrics(self) -> dict[str, float]:
        return {"comm/bytes": float(self.bytes), "comm/seconds": self.seconds, "comm/rounds": float(self.rounds)}

    def state_dict(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "seconds": self.seconds, "rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bytes, self.seconds, self.rounds = int(state["bytes"]), float(state["seconds"]), int(state["rounds"])

    @contextmanager
    def timed(self, device: torch.device) -> Iterator[None]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.seconds += time.perf_counter() - start


class Collectives:
    """The few collectives the periodic strategies need, each counted in a :class:`CommMeter`.

    ``group=None`` is the world; ranks passed as ``src`` are global ranks, as in ``torch.distributed``.
    """

    def __init__(self, meter: CommMeter, device: torch.device) -> None:
        self.meter = meter
        self.device = device

    def all_gather(self, tensor: Tensor, group: Any = None) -> Tensor:
        """Concatenation of every rank's 1-D ``tensor`` (rank order)."""
        out = tensor.new_empty(dist.get_world_size(group) * tensor.numel())
        self.meter.bytes += payload_bytes(out)
        with self.meter.timed(self.device):
            all_gather_single(out, tensor.reshape(-1).contiguous(), group=group)
        return out

    def broadcast(self, tensor: Tensor, src: int, group: Any = None) -> Tensor:
        self.meter.bytes += payload_bytes(tensor)
        with self.meter.timed(self.device):
            dist.broadcast(tensor, src=src, group=group)
        return tensor

    def all_reduce_sum(self, tensor: Tensor, group: Any = None) -> Tensor:
        # gloo has no ReduceOp.AVG, so callers divide the sum themselves.
        self.meter.bytes += payload_bytes(tensor)
        with self.meter.timed(self.device):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor
