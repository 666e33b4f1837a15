"""Accounted collectives: every strategy reports the same ``comm/*`` numbers, measured the same way.

``comm/bytes`` is the payload a rank hands to collectives (the size of the buffer it sends or receives into),
``comm/seconds`` the time the training stream spends waiting for them, and ``comm/rounds`` the number of rounds.

Timing without stalling the GPU: on CPU a collective returns when it is done, so wall time around the call is its
time. On CUDA a collective returns once it is enqueued and the current stream waits for it, so a wall clock would read
about 0; instead two CUDA events are recorded on the current stream around the call and read later, when the metrics
are logged (:meth:`CommMeter.metrics`), never on a step without a round.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
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
    _pending: list[tuple[Any, Any]] = field(default_factory=list, repr=False)  # CUDA events not read yet

    def metrics(self, by_scope: bool = False) -> dict[str, float]:
        """The counters as ``comm/*`` metrics (reads pending CUDA timings: call at round or logging time only)."""
        self.settle()
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

    def settle(self) -> None:
        """Add the time of every timed CUDA interval to ``seconds`` (waits for the last one to finish)."""
        for start, end in self._pending:
            end.synchronize()
            self.seconds += start.elapsed_time(end) / 1000.0
        self._pending.clear()

    def state_dict(self) -> dict[str, Any]:
        self.settle()
        return {k: getattr(self, k) for k in ("bytes", "seconds", "rounds", "bytes_intra", "bytes_inter")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bytes, self.seconds, self.rounds = int(state["bytes"]), float(state["seconds"]), int(state["rounds"])
        self.bytes_intra, self.bytes_inter = int(state.get("bytes_intra", 0)), int(state.get("bytes_inter", 0))
        self._pending.clear()

    @contextmanager
    def timed(self, device: torch.device) -> Iterator[None]:
        """Add the time of the body's communication to ``seconds`` (CUDA: events on the current stream)."""
        if device.type == "cuda":
            stream = torch.cuda.current_stream(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            try:
                yield
            finally:
                end.record(stream)
                self._pending.append((start, end))
            return
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - begin


class Collectives:
    """The few collectives the strategies need, each counted in a :class:`CommMeter`.

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

    def chain_broadcast(self, flats: Sequence[Tensor], src: int, rank: int, world_size: int) -> None:
        """``src``'s ``flats`` on every rank along the chain src -> src+1 -> ... (mod P), in place; see
        :func:`send_along_chain`. Counted as one payload per flat on every rank, like a broadcast."""
        for flat in flats:
            self.meter.count(payload_bytes(flat))
        with self.meter.timed(self.device):
            send_along_chain(flats, src, rank, world_size)


def send_along_chain(flats: Sequence[Tensor], src: int, rank: int, world_size: int, group: Any = None) -> None:
    """Deliver ``src``'s ``flats`` to every rank along the chain src, src+1, ..., src+P-1 (mod P), in place.

    Each flat is cut into ``max(16, 2P)`` pieces; a rank receives piece j from its predecessor and forwards it
    (without waiting for the send) before receiving piece j+1, so the hops overlap like a pipeline and every link
    carries one copy (a tree makes the source send about log2 P). Blocking, from the calling thread: gloo's
    point-to-point operations report no completion before they are waited for, so forwarding cannot be left to run
    in the background. Ranks are global ranks; ``group`` must contain all of them.
    """
    position = (rank - src) % world_size
    previous = (rank - 1) % world_size if position > 0 else None
    following = (rank + 1) % world_size if position < world_size - 1 else None
    sends = []
    tag = 0
    for flat in flats:
        for piece in flat.tensor_split(min(flat.numel(), max(16, 2 * world_size))):
            # A tag per piece: each send is matched to its own receive, whatever the arrival order.
            if previous is not None:
                dist.recv(piece, src=previous, group=group, tag=tag)
            if following is not None:
                sends.append(dist.isend(piece, dst=following, group=group, tag=tag))
            tag += 1
    for work in sends:
        work.wait()
