"""Keeping the workers of one ``fit`` together without a collective on every step: stop requests and heartbeats.

Lightning (2.5+) broadcasts rank 0's SIGTERM flag before *every* training batch of a distributed run and reads it
with ``.item()``: a collective over all workers plus a host synchronization per step, which puts every worker in
lockstep and drains the GPU queue between rounds. Its SIGTERM handler also runs a broadcast from inside the signal
handler, which blocks a rank that received the signal alone. For the package's strategies both are replaced, on that
trainer only, while it fits (:class:`JobControl`):

- the signal handler only takes note (and forwards the signal to the processes Lightning's launcher started);
- before each training batch every worker posts its heartbeat (batches started) to the job's store and reads the
  stop request there: a SIGTERM on any rank becomes a request that every worker sees before its next batch;
- a SIGTERM stop happens at a common batch: a worker that sees the request runs on until it has started as many
  batches as the furthest worker, waits for the others to get there, and raises Lightning's ``SIGTERMException``,
  so every worker stops at the same point and a checkpoint written on the way out (``OnExceptionCheckpoint``) is
  consistent. Between rounds the workers only differ by batches that need no collective, so nobody waits for a
  collective that another worker skipped (the asynchronous strategies' fast workers wait for the slow ones to
  catch up: a checkpoint must hold every worker at the same step);
- a worker that raised posts its error; the others stop before their next batch with an error naming it.

Cost per training batch: two store operations (a set and a check), no collective and no host synchronization.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from datetime import timedelta
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ..core.health import FAILED, HealthBoard, augment, handle_worker_exception
from ..core.watchdog import Watchdog


class JobControl:
    """Stop requests and heartbeats of one ``fit`` through the job's store (see the module docstring).

    Args:
        health: the fit's health board.
        timeout_s: how long a worker waiting for the common stop tolerates a worker that starts no batch.
    """

    def __init__(self, health: HealthBoard, timeout_s: float) -> None:
        self.health = health
        self.timeout_s = timeout_s
        self.started = 0  # training batches this worker has started in this fit
        self.stopping_together = False  # the workers agreed to stop here (a checkpoint may be written)
        self._sigterm = False
        self._trainer: pl.Trainer | None = None
        self._loop: Any = None
        self._previous_handler: Any = None
        self.watchdog: Watchdog | None = None  # NCCL only: names a dead or hung peer, see core.watchdog
        self.while_waiting: Callable[[], None] | None = None  # work the others may need while this worker waits

    @classmethod
    def start(cls, trainer: pl.Trainer, health: HealthBoard, timeout: timedelta | None) -> JobControl:
        """A job control installed on ``trainer`` for one ``fit`` (``timeout`` None: 30 minutes)."""
        job = cls(health, timeout.total_seconds() if timeout is not None else 1800.0)
        job.install(trainer)
        if dist.is_initialized() and dist.get_backend() == "nccl":  # gloo raises on a dead or hung peer by itself
            job.watchdog = Watchdog(health, lambda: job.started, job.timeout_s, abort=_abort_communicators)
            job.watchdog.start()
        return job

    def install(self, trainer: pl.Trainer, started: int = 0) -> None:
        """Replace Lightning's per-batch broadcast on ``trainer``'s training loop."""
        self._trainer, self.started = trainer, started
        loop = trainer.fit_loop.epoch_loop
        if hasattr(loop, "_broadcast_sigterm_tensor"):
            loop._broadcast_sigterm_tensor = self.before_batch
            self._loop = loop

    def take_over_sigterm(self) -> None:
        """Replace Lightning's SIGTERM notifier (call when training starts: Lightning registers its handlers after
        the strategy's ``setup``). The main thread only, as ``signal`` requires."""
        if self._previous_handler is None and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def uninstall(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        if self._loop is not None:  # back to Lightning's own method
            vars(self._loop).pop("_broadcast_sigterm_tensor", None)
            self._loop = None
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
        self._trainer = None

    def on_exception(self, exception: BaseException) -> None:
        """Post this rank's error (or name the failed rank in a broken collective's error); an agreed SIGTERM stop
        is no failure."""
        if isinstance(exception, SIGTERMException) and self.stopping_together:
            return
        if self.watchdog is not None and self.watchdog.reason is not None:
            reason = self.watchdog.reason
            augment(exception, f"[lsgd_lightning] rank {self.health.rank} aborted its collective: {reason}.")
        handle_worker_exception(self.health, exception)

    def handling_failure(self) -> bool:
        """Whether this worker is handling an exception that the others did not stop for together (anything but an
        agreed SIGTERM stop): then it must enter no collective, which the others would never join (Lightning calls
        ``on_exception`` callbacks such as ``OnExceptionCheckpoint`` before the strategy's own ``on_exception``)."""
        trainer = self._trainer
        return trainer is not None and trainer.state.status == TrainerStatus.INTERRUPTED and not self.stopping_together

    def warn_checkpoint_skipped(self) -> None:
        warnings.warn(
            f"rank {self.health.rank}: no checkpoint written while handling an exception: a sharded checkpoint "
            "needs every worker, and the others did not stop together with this one (a SIGTERM stops them all at a "
            "common batch; a failure does not).",
            RuntimeWarning,
            stacklevel=3,
        )

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        # No collective here (Lightning's notifier broadcasts from inside the handler, which blocks a rank that got
        # the signal alone); the next batch posts the request. The children of Lightning's subprocess launcher
        # (rank 0 started them) get the signal too, as Lightning's own handler would send it.
        if not self._sigterm and self._trainer is not None and self._trainer.strategy.launcher is not None:
            self._trainer.strategy.launcher.kill(signum)
        self._sigterm = True

    def before_batch(self) -> None:
        """Lightning calls this before every training batch (in place of its SIGTERM broadcast)."""
        if self._sigterm:
            self.health.request_stop(f"SIGTERM on rank {self.health.rank}")
        request = self.health.stop_request()
        if request is not None and self._should_stop_now(request):
            self.stopping_together = True
            if self._trainer is not None:
                self._trainer._signal_connector.received_sigterm = True
            raise SIGTERMException()
        self.started += 1
        self.health.post_progress(self.started)

    def _should_stop_now(self, request: str) -> bool:
        """Raise for a failure; ``True`` to stop before this batch, ``False`` to run it (others are further)."""
        if request.startswith(FAILED):
            rank = int(request.split()[1])
            found = self.health.failure([rank])
            message = found[1] if found is not None else "an error"
            raise RuntimeError(
                f"rank {self.health.rank} stopped before its next training batch: rank {rank} failed with {message}"
            )
        ranks = list(range(self.health.world_size))
        last_change, last = time.monotonic(), None
        while True:
            progress = self.health.progress(ranks)
            if self.started < max(progress):
                return False  # a worker is further: run up to where it is (no collective is skipped on the way)
            if all(p == self.started for p in progress):
                return True
            if progress != last:
                last_change, last = time.monotonic(), progress
            elif time.monotonic() - last_change > self.timeout_s:
                behind = [r for r, p in zip(ranks, progress) if p < self.started]
                raise RuntimeError(
                    f"rank {self.health.rank} was stopping ({request}) at training batch {self.started}, but rank(s) "
                    f"{behind} started no batch for {self.timeout_s:g} s (killed, hung, or stopped early)."
                )
            if self.while_waiting is not None:
                self.while_waiting()
            time.sleep(0.01)


def report_exception(job: JobControl | None, health: HealthBoard | None, exception: BaseException) -> None:
    """A strategy's ``on_exception``: through the job control while fitting, else straight to the health board."""
    if job is not None:
        job.on_exception(exception)
    else:
        handle_worker_exception(health, exception)


def limit_cpu_threads(local_workers: int, devices: list[torch.device] | None) -> None:
    """Share the CPU cores among the local workers, unless the user chose (``OMP_NUM_THREADS``)."""
    if "OMP_NUM_THREADS" in os.environ or not devices or devices[0].type != "cpu":
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // max(1, local_workers)))


def _abort_communicators(reason: str) -> None:
    """The watchdog's verdict on NCCL: abort the communicators so that the stuck collective raises in the training
    thread (where the error is reported as usual); if that is impossible, say why and end the process."""
    try:
        dist.distributed_c10d._abort_process_group()
    except Exception as error:
        print(f"[lsgd_lightning] {reason}; aborting the process ({error!r})", file=sys.stderr, flush=True)
        os._exit(1)
