"""A parameter holder and notice board on the job's c10d store, for the asynchronous strategies.

The asynchronous strategies need something no collective gives: one worker reads or changes shared state (the
leader's weights, EASGD's center, DOWNPOUR's parameters) while the others keep training. The job already has a
place for that: the key-value store that torch.distributed's rendezvous created (a ``TCPStore`` served from the
rank-0 process, reachable from every rank, on CPU and GPU jobs alike). :class:`StoreBoard` keeps, under a prefix
unique to one ``fit``:

- a mutual-exclusion lock (``compare_set`` on one key): every read-modify-write of the shared state runs under it,
  so the rounds of different workers are serialized and each sees the state the previous one left;
- flat tensors (weights), through a :class:`~.holder.WeightHolder`: on the store itself by default, or in the rank-0
  process by ``torch.distributed.rpc`` (:class:`~.holder.RpcHolder`, what the asynchronous strategies use by
  default); a reader under the lock always gets one complete version;
- small text records (e.g. the leader's rank and score);
- a rendezvous that waits for every worker to reach the same point (watching their heartbeats).

Waiting never hangs: while a worker waits for the lock or a rendezvous it watches the workers it waits for. It gives
up with an error naming them if one of them posted a failure (the fit's :class:`~.health.HealthBoard`) or if none of
them started a training batch for ``timeout_s`` seconds (killed, hung, or stopped early). A slow worker that is still
stepping is waited for as long as it keeps stepping.

Costs: everything travels to or from the rank-0 process, like a parameter server. Reading or writing d float32 values
moves 4·d bytes (measured in RESULTS.md section 8: about 200 MB/s through the store, about 1 GB/s through RPC, on
loopback on a 2-core machine).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor

from .collectives import CommMeter, payload_bytes
from .health import HealthBoard
from .holder import StoreHolder, WeightHolder

FAILURE_GRACE_S = 2.0  # how long a broken transfer looks for a failure another worker is posting
_FREE = ""  # value of the lock key when nobody holds it (compare_set treats a missing key as "")


class BoardTimeout(RuntimeError):
    """A worker waited for others that neither progressed nor reported a failure (message says who)."""


class StoreBoard:
    """Shared state of one asynchronous ``fit`` on the job's store (see the module docstring).

    Args:
        prefix: key prefix, unique to this ``fit`` on this process group.
        rank, world_size: this worker and the number of workers.
        timeout_s: how long a waiting worker tolerates no progress from those it waits for.
        meter: where the bytes and seconds of transfers are counted.
        device: where tensors read from the board are placed.
        health: the fit's :class:`~.health.HealthBoard`: who failed, and each worker's heartbeat.
    """

    def __init__(
        self,
        prefix: str,
        rank: int,
        world_size: int,
        timeout_s: float,
        meter: CommMeter,
        device: torch.device,
        health: HealthBoard,
        store: dist.Store | None = None,
    ) -> None:
        base = store if store is not None else dist.distributed_c10d._get_default_store()
        # No set_timeout: it would pass on to the job's shared store. Every key read here exists when it is read.
        self.store = dist.PrefixStore(f"{prefix}/", base)
        self.health = health
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.meter = meter
        self.device = device
        self._rendezvous_count = 0
        # Called over and over while this worker waits at a rendezvous: work the others may need from it meanwhile
        # (asynchronous LSGD's rounds, which every worker joins).
        self.while_waiting: Callable[[], None] | None = None
        self.holds_lock = False
        self.transaction = 0  # number of the last transaction this worker ran: the board's order of transactions
        # Where put/get move the weights (core.holder): on the store itself unless a strategy opens another holder.
        self.holder: WeightHolder = StoreHolder(self.store)

    # ---------------------------------------------------------------------------------------------- lock
    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the board's lock for the body (re-entrant use is a bug and raises)."""
        if self.holds_lock:
            raise RuntimeError("StoreBoard.locked() is not re-entrant.")
        me = str(self.rank)
        watch = _Watch(self, "the board's lock")
        pause = 0.0005
        while True:
            holder = self.store.compare_set("lock", _FREE, me).decode()
            if holder == me:
                break
            watch.check([int(holder)] if holder.isdigit() else [])
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
        self.holds_lock = True
        self.transaction = int(self.store.add("transactions", 1))
        try:
            yield
        finally:
            self.holds_lock = False
            self.store.compare_set("lock", me, _FREE)

    # ---------------------------------------------------------------------------------------------- tensors
    def put(self, name: str, flats: Sequence[Tensor]) -> None:
        """Hold ``flats`` under ``name`` (call under the lock so readers never see a half-written version)."""
        with self.meter.timed(self.device), self._naming_failures(f"writing {name!r}"):
            self.holder.put(name, flats)
        self.meter.count(sum(payload_bytes(flat) for flat in flats))

    def get(self, name: str, like: Sequence[Tensor]) -> list[Tensor]:
        """Read the tensors held under ``name``; ``like`` gives their sizes, dtypes and device."""
        with self.meter.timed(self.device), self._naming_failures(f"reading {name!r}"):
            out = self.holder.get(name, like)
        self.meter.count(sum(payload_bytes(flat) for flat in like))
        return out

    @contextmanager
    def _naming_failures(self, what: str) -> Iterator[None]:
        """A transfer that breaks because another worker failed (the holder's process ended its transport) raises
        that worker's error, not the transport's; otherwise the transport's error stands."""
        try:
            yield
        except Exception as error:
            others = [r for r in range(self.world_size) if r != self.rank]
            deadline = time.monotonic() + FAILURE_GRACE_S  # the failed worker may still be posting its error
            while (failed := self.health.failure(others)) is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if failed is None:
                raise
            rank, message = failed
            raise RuntimeError(
                f"rank {self.rank} was {what} on the board and rank {rank} failed with {message}"
            ) from error

    # ---------------------------------------------------------------------------------------------- records
    def set_record(self, name: str, value: str) -> None:
        self.store.set(f"r/{name}", value)

    def get_record(self, name: str) -> str:
        return self.store.get(f"r/{name}").decode()

    def has_record(self, name: str) -> bool:
        return self.store.check([f"r/{name}"])

    def add(self, name: str, amount: int) -> int:
        """Add ``amount`` to the job-wide counter ``name`` (created at 0) and return its new value (0 reads it)."""
        return int(self.store.add(f"c/{name}", amount))

    # ---------------------------------------------------------------------------------------------- meeting
    def rendezvous(self, what: str) -> None:
        """Return once every worker has called ``rendezvous`` as often as this one (the n-th call meets the n-th)."""
        self._rendezvous_count += 1
        key = f"rdv/{self._rendezvous_count}"
        self.store.set(f"{key}/{self.rank}", "1")
        arrived = self.store.add(key, 1)
        watch = _Watch(self, what)
        pause = 0.0005
        while arrived < self.world_size:
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
            if self.while_waiting is not None:
                self.while_waiting()
            arrived = self.store.add(key, 0)
            if watch.due():
                missing = [r for r in range(self.world_size) if not self.store.check([f"{key}/{r}"])]
                watch.check(missing)


class _Watch:
    """Progress watchdog of a waiting worker: raise if those it waits for failed or stopped training."""

    def __init__(self, board: StoreBoard, what: str) -> None:
        self.board = board
        self.what = what
        self.last_seen: dict[int, int] = {}
        now = time.monotonic()
        self.deadline = now + board.timeout_s
        self.next_check = now + 0.5

    def due(self) -> bool:
        return time.monotonic() >= self.next_check

    def check(self, ranks: Sequence[int]) -> None:
        if not self.due() or not ranks:
            return
        now = time.monotonic()
        self.next_check = now + 0.5
        failed = self.board.health.failure(ranks)
        if failed is not None:
            rank, message = failed
            raise RuntimeError(
                f"rank {self.board.rank} was waiting for {self.what} and rank {rank} failed with {message}"
            )
        seen = dict(zip(ranks, self.board.health.progress(ranks)))
        if any(self.last_seen.get(r) != s for r, s in seen.items()):
            self.last_seen.update(seen)
            self.deadline = now + self.board.timeout_s  # someone we wait for is still stepping
        elif now > self.deadline:
            raise BoardTimeout(
                f"rank {self.board.rank} timed out waiting for {self.what}: rank(s) {list(ranks)} took no optimizer "
                f"step for {self.board.timeout_s:g} s (started no training batch) and reported no error (killed, "
                "hung, or stopped early)."
            )
