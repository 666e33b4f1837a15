"""Naming a dead or hung peer on NCCL within the strategy's timeout.

On gloo a peer that dies closes its sockets, so the others' next collective raises at once, and a hung peer makes it
raise after the process group's timeout: the error handler then names the culprit (:mod:`.health`). On NCCL neither
happens in Python: the kernels spin until NCCL's own watchdog kills the process at the timeout, with a C++ abort
instead of the user's error. :class:`Watchdog` is a thread that reads only the job's store (never a communicator):
while this worker's training thread makes no progress, it watches the others' heartbeats and failure reports, and
when a peer failed, or stopped training for most of the timeout, it records why and calls ``abort`` (on NCCL: abort
the communicators, so the blocked collective raises in the training thread and the usual error path runs).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .health import FAILED, HealthBoard


@dataclass
class Observation:
    """What the watchdog last saw of one rank's heartbeat, and since when it has not changed (monotonic seconds)."""

    value: int
    since: float


@dataclass
class Judge:
    """The watchdog's decision, separated from its thread so that it can be tested with made-up clocks.

    Args:
        timeout_s: how long a peer may start no training batch, while this worker waits, before it is called hung.
        failure_grace_s: how long this worker must have been stuck before a peer's posted failure aborts it (it may
            simply be on its way to notice the failure itself).
    """

    timeout_s: float
    failure_grace_s: float = 2.0
    seen: dict[int, Observation] = field(default_factory=dict)

    def verdict(self, now: float, own_stuck_s: float, progress: dict[int, int], failure: str | None) -> str | None:
        """Why to abort now, or ``None``. ``progress``: each peer's heartbeat; ``failure``: a peer's posted error."""
        for rank, value in progress.items():
            if rank not in self.seen or self.seen[rank].value != value:
                self.seen[rank] = Observation(value, now)
        if failure is not None and own_stuck_s >= self.failure_grace_s:
            return failure
        if own_stuck_s < self.timeout_s:
            return None
        hung = sorted(rank for rank, seen in self.seen.items() if now - seen.since >= self.timeout_s)
        if not hung:
            return None
        return (
            f"rank(s) {hung} started no training batch for {self.timeout_s:g} s and reported no error (killed, hung, "
            "or out of memory)"
        )


class Watchdog(threading.Thread):
    """A daemon thread that aborts a stuck collective when a peer failed or hung (see the module docstring).

    Args:
        health: the fit's health board (store reads only).
        own_progress: this worker's batches started so far (read from the training thread's counter).
        timeout_s: the strategy's collective timeout; a hung peer is called so after 80% of it (before NCCL's own
            watchdog takes the process down at the full timeout).
        abort: what to do, given the reason (e.g. abort the NCCL communicators).
        interval_s: how often to look.
    """

    def __init__(
        self,
        health: HealthBoard,
        own_progress: Callable[[], int],
        timeout_s: float,
        abort: Callable[[str], None],
        interval_s: float = 1.0,
    ) -> None:
        super().__init__(name="lsgd-lightning-watchdog", daemon=True)
        self.health = health
        self.own_progress = own_progress
        self.judge = Judge(timeout_s=0.8 * timeout_s)
        self.abort = abort
        self.interval_s = interval_s
        self.reason: str | None = None
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        peers: Sequence[int] = [r for r in range(self.health.world_size) if r != self.health.rank]
        last, stuck_since = self.own_progress(), time.monotonic()
        while not self._stop_event.wait(self.interval_s):
            now, current = time.monotonic(), self.own_progress()
            if current != last:
                last, stuck_since = current, now
                continue
            try:
                request = self.health.stop_request()
                failed = self.health.failure(peers) if request and request.startswith(FAILED) else None
                failure = f"rank {failed[0]} failed with {failed[1]}" if failed else None
                progress = dict(zip(peers, self.health.progress(peers)))
            except Exception:  # the store's host (rank 0) is gone: the collective will fail on its own
                continue
            reason = self.judge.verdict(now, now - stuck_since, progress, failure)
            if reason is not None:
                self.reason = reason
                self.abort(reason)
                return
