"""Name the failed worker when a distributed job breaks.

When one worker dies, the others see only a broken collective ("Connection closed by peer [127.0.0.1]:56237") or,
if it hangs, a collective timeout. The failure board turns that into "rank 2 failed": through the job's rendezvous
store (a TCPStore served by rank 0's process), a worker that raises posts its error, and a worker whose collective
broke checks in as alive, waits a few seconds for the others to do the same, and names those that posted an error
or never answered. Every step is best effort: if the store itself is gone (rank 0's process died), that is what the
message says.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from datetime import timedelta

import torch
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


def is_communication_error(error: BaseException) -> bool:
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(error, dist_error):
        return True
    return isinstance(error, RuntimeError) and any(marker in str(error) for marker in _COMMUNICATION_MARKERS)


class FailureBoard:
    """Per-job notice board on the default store; keys live under ``prefix`` (unique per ``fit``)."""

    def __init__(self, prefix: str, rank: int, world_size: int, wait_s: float) -> None:
        self.prefix = prefix
        self.rank = rank
        self.world_size = world_size
        self.wait_s = wait_s

    def _store(self) -> dist.Store | None:
        try:
            store = dist.distributed_c10d._get_default_store()
            store.set_timeout(timedelta(seconds=max(1.0, self.wait_s)))
            return store
        except Exception:
            return None

    def report(self, error: BaseException) -> None:
        """Post this rank's error so the others can name it."""
        store = self._store()
        if store is None:
            return
        with contextlib.suppress(Exception):  # best effort: the store may be gone too
            store.set(f"{self.prefix}/failed/{self.rank}", f"{type(error).__name__}: {error}"[:500])

    def describe_peers(self) -> str:
        """Check in as alive, wait up to ``wait_s`` for the others, and say who failed or went silent."""
        store = self._store()
        if store is None:
            return "The job's rendezvous store is unreachable, so its host (the rank 0 process) probably failed."
        try:
            store.set(f"{self.prefix}/alive/{self.rank}", "1")
            deadline = time.monotonic() + self.wait_s
            failed: dict[int, str] = {}
            alive: set[int] = {self.rank}
            while True:
                for rank in range(self.world_size):
                    if rank in failed or rank in alive:
                        continue
                    if store.check([f"{self.prefix}/failed/{rank}"]):
                        failed[rank] = store.get(f"{self.prefix}/failed/{rank}").decode(errors="replace")
                    elif store.check([f"{self.prefix}/alive/{rank}"]):
                        alive.add(rank)
                silent = [r for r in range(self.world_size) if r not in failed and r not in alive]
                if not silent or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        except Exception:
            return "The job's rendezvous store stopped answering, so its host (the rank 0 process) probably failed."
        parts = [f"rank {rank} failed with {message}" for rank, message in sorted(failed.items())]
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


def new_board(rank: int, world_size: int, timeout: timedelta | None) -> FailureBoard:
    """A board with keys unique to this ``fit`` (so one process can run several jobs on one process group)."""
    global _boards_created
    _boards_created += 1
    wait_s = 3.0 if timeout is None else max(0.5, min(3.0, timeout.total_seconds() / 2))
    return FailureBoard(f"lsgd_lightning/job{_boards_created}", rank, world_size, wait_s)


def handle_worker_exception(board: FailureBoard | None, error: BaseException) -> None:
    """Post this rank's own error, or, if a collective broke, add who failed to the message."""
    if board is None or board.world_size == 1 or not dist.is_initialized():
        return
    if is_communication_error(error):
        augment(error, f"[lsgd_lightning] rank {board.rank}: a collective failed; {board.describe_peers()}")
    else:
        board.report(error)


def check_equal_epoch_lengths(batches_per_epoch: float, device: torch.device, strategy_name: str) -> None:
    """Refuse training data whose ranks would take different numbers of steps (a collective would then wait for
    ranks that already left the epoch); warn when the lengths are unknown (an iterable dataset without ``__len__``).

    Called on every rank at the start of training, after the process group exists.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    lengths = torch.empty(dist.get_world_size(), dtype=torch.float64, device=device)
    dist.all_gather_into_tensor(lengths, torch.tensor([batches_per_epoch], dtype=torch.float64, device=device))
    values = lengths.tolist()
    if any(math.isinf(v) for v in values):
        if dist.get_rank() == 0:
            warnings.warn(
                f"{strategy_name}: the training data has no length on some ranks (an iterable dataset without "
                "__len__), so nothing guarantees that every rank takes the same number of steps. If one runs out "
                "first, the others wait in a collective until the timeout. Give the dataset a __len__ that is equal "
                "on every rank, or set Trainer(max_steps=...) with data that never runs out.",
                RuntimeWarning,
                stacklevel=2,
            )
        return
    if len(set(values)) > 1:
        per_rank = ", ".join(f"rank {r}: {int(v)}" for r, v in enumerate(values))
        raise ValueError(
            f"{strategy_name}: the ranks' training data have different numbers of batches per epoch ({per_rank}), "
            "so they would take different numbers of optimizer steps and a collective would deadlock. Use a "
            "map-style dataset (Lightning then shards it evenly with a DistributedSampler) or make every rank's "
            "iterable yield the same number of batches."
        )
