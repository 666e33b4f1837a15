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
    """Cumulative communication counters of one rank.

    ``bytes_intra`` and ``bytes_inter`` split ``bytes`` by whether a collective stays inside a worker group (a node)
    or crosses group boundaries; strategies without groups leave them at zero and do not report them.
    """

    bytes: int = 0
    seconds: float = 0.0
    rounds: int = 0
    bytes_intra: int = 0
    bytes_inter: int = 0

    def metrics(self, by_scope: bool = False) -> dict[str, float]:
        metrics = {"comm/bytes": float(self.bytes), "comm/seconds": self.seconds, "comm/rounds": float(self.rounds)}
        if by_scope:
            metrics.update({"comm/bytes_intra": float(self.bytes_intra), "comm/bytes_inter": float(self.bytes_inter)})
        return metrics

    def count(self, nbytes: int, scope: str | None = None) -> None:
        self.bytes += nbytes
        if scope == "intra":
            self.bytes_intra += nbytes
        elif scope == "inter":
            self.bytes_inter += nbytes

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("bytes", "seconds", "rounds", "bytes_intra", "bytes_inter")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bytes, self.seconds, self.rounds = int(state["bytes"]), float(state["seconds"]), int(state["rounds"])
        self.bytes_intra, self.bytes_inter = int(state.get("bytes_intra", 0)), int(state.get("bytes_inter", 0))

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
    ``scope`` ("intra", "inter" or None) says which of the meter's per-scope counters the bytes also go to.
    """

    def __init__(self, meter: CommMeter, device: torch.device) -> None:
        self.meter = meter
        self.device = device

    def all_gather(self, tensor: Tensor, group: Any = None, scope: str | None = None) -> Tensor:
        """Concatenation of every rank's 1-D ``tensor`` (rank order)."""
        out = tensor.new_empty(dist.get_world_size(group) * tensor.numel())
        self.meter.count(payload_bytes(out), scope)
        with self.meter.timed(self.device):
            all_gather_single(out, tensor.reshape(-1).contiguous(), group=group)
        return out

    def broadcast(self, tensor: Tensor, src: int, group: Any = None, scope: str | None = None) -> Tensor:
        self.meter.count(payload_bytes(tensor), scope)
        with self.meter.timed(self.device):
            dist.broadcast(tensor, src=src, group=group)
        return tensor

    def all_reduce_sum(self, tensor: Tensor, group: Any = None, scope: str | None = None) -> Tensor:
        # gloo has no ReduceOp.AVG, so callers divide the sum themselves.
        self.meter.count(payload_bytes(tensor), scope)
        with self.meter.timed(self.device):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor
