"""The health of one distributed ``fit``, kept on the job's c10d store: failures, heartbeats and stop requests.

When one worker dies, the others see only a broken collective ("Connection closed by peer [127.0.0.1]:56237") or,
if it hangs, a collective timeout. The job's rendezvous store (a TCPStore served by rank 0's process, reachable from
every rank on CPU and GPU jobs alike) carries what they need to say more, under a prefix unique to one ``fit``:

- ``failed/<rank>``: the error a worker raised, posted by that worker;
- ``p/<rank>``: its heartbeat, the number of training batches it has started (set before each batch);
- ``stop``: the first request to stop the job (a SIGTERM somewhere, or a failure), which every worker reads before
  its next batch.

A worker whose collective broke checks in as alive, waits a few seconds for the others, and names those that posted
an error, those whose heartbeat still moves (alive and training: they simply had not reached that collective), and
those that went silent. Every read is best effort: if the store itself is gone (rank 0's process died), that is what
the message says.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from datetime import timedelta

import torch.distributed as dist

# Substrings of the errors torch.distributed raises when a peer is gone or a collective timed out.
_COMMUNICATION_MARKERS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "gloo",
    "NCCL",
    "Timed out",
    "timed out",
    "Socket Timeout",
)
FAILED = "failed"  # a stop request's first word when a worker failed (then nobody waits for anybody)


def is_communication_error(error: BaseException) -> bool:
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(error, dist_error):
        return True
    return isinstance(error, RuntimeError) and any(marker in str(error) for marker in _COMMUNICATION_MARKERS)


class HealthBoard:
    """Per-fit notice board on the default store; keys live under ``prefix`` (unique per ``fit``).

    Args:
        prefix: key prefix, unique to this ``fit`` on this process group.
        rank, world_size: this worker and the number of workers.
        wait_s: how long :meth:`describe_peers` waits for the others to check in, in seconds.
        store: the store (default: the default process group's).
    """

    def __init__(
        self, prefix: str, rank: int, world_size: int, wait_s: float, store: dist.Store | None = None
    ) -> None:
        self.prefix = prefix
        self.rank = rank
        self.world_size = world_size
        self.wait_s = wait_s
        self._base = store

    def _store(self) -> dist.Store | None:
        # Never set_timeout here: it would change the timeout of the job's shared store (a PrefixStore passes it
        # on), which torch.distributed itself uses. Every read checks that its key exists first, so nothing blocks.
        try:
            return self._base if self._base is not None else dist.distributed_c10d._get_default_store()
        except Exception:
            return None

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    # ---------------------------------------------------------------------------------------------- failures
    def report(self, error: BaseException) -> None:
        """Post this rank's error so the others can name it, and ask everyone to stop."""
        store = self._store()
        if store is None:
            return
        with contextlib.suppress(Exception):  # best effort: the store may be gone too
            store.set(self._key(f"failed/{self.rank}"), f"{type(error).__name__}: {error}"[:500])
            store.compare_set(self._key("stop"), "", f"{FAILED} {self.rank}")

    def failure(self, ranks: Sequence[int]) -> tuple[int, str] | None:
        """The first of ``ranks`` that posted an error, with its message."""
        store = self._store()
        if store is None:
            return None
        for rank in ranks:
            key = self._key(f"failed/{rank}")
            if store.check([key]):
                return rank, store.get(key).decode(errors="replace")
        return None

    # ---------------------------------------------------------------------------------------------- heartbeats
    def post_progress(self, batches: int) -> None:
        """This worker's heartbeat: the number of training batches it has started."""
        store = self._store()
        if store is not None:
            store.set(self._key(f"p/{self.rank}"), str(batches))

    def progress(self, ranks: Sequence[int]) -> list[int]:
        """The heartbeats of ``ranks`` (0 for a worker that has posted none yet)."""
        store = self._store()
        if store is None:
            return [0 for _ in ranks]
        keys = [self._key(f"p/{r}") for r in ranks]
        return [int(store.get(key).decode()) if store.check([key]) else 0 for key in keys]

    # ---------------------------------------------------------------------------------------------- stopping
    def request_stop(self, reason: str) -> None:
        """Ask every worker to stop (the first request wins; later ones are ignored)."""
        store = self._store()
        if store is not None:
            store.compare_set(self._key("stop"), "", reason)

    def stop_request(self) -> str | None:
        """The request to stop, if any worker made one."""
        store = self._store()
        if store is None or not store.check([self._key("stop")]):
            return None
        return store.get(self._key("stop")).decode()

    # ---------------------------------------------------------------------------------------------- diagnosis
    def describe_peers(self) -> str:
        """Check in as alive, wait up to ``wait_s`` for the others, and say who failed, who is still training and
        who went silent."""
        store = self._store()
        if store is None:
            return "The job's rendezvous store is unreachable, so its host (the rank 0 process) probably failed."
        others = [r for r in range(self.world_size) if r != self.rank]
        try:
            store.set(self._key(f"alive/{self.rank}"), "1")
            heartbeats = dict(zip(others, self.progress(others)))
            deadline = time.monotonic() + self.wait_s
            failed: dict[int, str] = {}
            alive: set[int] = {self.rank}
            while True:
                for rank in others:
                    if rank in failed or rank in alive:
                        continue
                    if store.check([self._key(f"failed/{rank}")]):
                        failed[rank] = store.get(self._key(f"failed/{rank}")).decode(errors="replace")
                    elif store.check([self._key(f"alive/{rank}")]):
                        alive.add(rank)
                silent = [r for r in range(self.world_size) if r not in failed and r not in alive]
                if not silent or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            now = dict(zip(silent, self.progress(silent)))
        except Exception:
            return "The job's rendezvous store stopped answering, so its host (the rank 0 process) probably failed."
        training = [r for r in silent if now[r] != heartbeats[r]]
        silent = [r for r in silent if r not in training]
        parts = [f"rank {rank} failed with {message}" for rank, message in sorted(failed.items())]
        if training:
            batches = ", ".join(f"rank {r}: batch {now[r]}" for r in training)
            parts.append(
                f"rank(s) {training} are alive and still training ({batches}), so they had not reached this "
                "collective: a collective run outside the strategy's meeting points (in a callback, or a metric's "
                "sync) while the workers were at different batches"
            )
        if silent:
            parts.append(f"rank(s) {silent} did not answer within {self.wait_s:g} s (killed, hung, or out of memory)")
        if not parts:
            return "Every other rank is alive; the communication error did not come from a failed worker."
        return "; ".join(parts) + "."


def augment(error: BaseException, note: str) -> None:
    """Append ``note`` to the exception's message, in place (the traceback stays)."""
    if error.args and isinstance(error.args[0], str):
        error.args = (f"{error.args[0]}\n{note}", *error.args[1:])
    else:
        error.args = (*error.args, note)


_boards_created = 0  # the same count on every rank: all ranks set up the same sequence of Trainer runs


def new_board(rank: int, world_size: int, timeout: timedelta | None) -> HealthBoard:
    """A board with keys unique to this ``fit`` (so one process can run several jobs on one process group)."""
    global _boards_created
    _boards_created += 1
    wait_s = 3.0 if timeout is None else max(0.5, min(3.0, timeout.total_seconds() / 2))
    return HealthBoard(f"lsgd_lightning/job{_boards_created}", rank, world_size, wait_s)


def handle_worker_exception(board: HealthBoard | None, error: BaseException) -> None:
    """Post this rank's own error, or, if a collective broke, add who failed to the message."""
    if board is None or board.world_size == 1 or not dist.is_initialized():
        return
    if is_communication_error(error):
        augment(error, f"[lsgd_lightning] rank {board.rank}: a collective failed; {board.describe_peers()}")
    else:
        board.report(error)
