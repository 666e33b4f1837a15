"""The job's health board and the collective guard, in one process on a real TCPStore (no process group needed)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from lsgd_lightning.core.guard import CollectiveGuard
from lsgd_lightning.core.health import FAILED, HealthBoard
from lsgd_lightning.core.watchdog import Judge, Watchdog
from tests.multiproc import free_port


@pytest.fixture
def store() -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", free_port(), 1, True, timeout=timedelta(seconds=30))


def board(store: dist.Store, rank: int, world_size: int = 3, wait_s: float = 1.0) -> HealthBoard:
    return HealthBoard("job1", rank, world_size, wait_s, store=store)


def test_a_live_training_worker_is_never_called_dead(store: dist.TCPStore) -> None:
    """Rank 1 keeps posting heartbeats while rank 0 describes its peers; rank 2 posted an error."""
    me, live, failed = board(store, 0), board(store, 1), board(store, 2)
    failed.report(RuntimeError("out of memory"))
    stop = threading.Event()

    def train() -> None:
        batches = 0
        while not stop.is_set():
            batches += 1
            live.post_progress(batches)
            time.sleep(0.05)

    thread = threading.Thread(target=train)
    thread.start()
    try:
        message = me.describe_peers()
    finally:
        stop.set()
        thread.join()
    assert "rank 2 failed with RuntimeError: out of memory" in message
    assert "rank(s) [1] are alive and still training" in message
    assert "did not answer" not in message


def test_a_silent_worker_is_named_as_such(store: dist.TCPStore) -> None:
    board(store, 1).post_progress(5)  # it trained once, then went quiet
    message = board(store, 0, world_size=2, wait_s=0.5).describe_peers()
    assert "rank(s) [1] did not answer within 0.5 s" in message


def test_the_first_stop_request_wins_and_a_failure_asks_everyone_to_stop(store: dist.TCPStore) -> None:
    first, second = board(store, 0), board(store, 1)
    assert first.stop_request() is None
    second.report(ValueError("bad batch"))
    first.request_stop("SIGTERM on rank 0")
    assert first.stop_request() == f"{FAILED} 1"
    assert first.failure([0, 1]) == (1, "ValueError: bad batch")
    assert first.progress([0, 1, 2]) == [0, 0, 0]


def test_the_health_board_leaves_the_shared_store_timeout_alone(store: dist.TCPStore) -> None:
    health = board(store, 0)
    health.post_progress(1)
    health.describe_peers()
    assert store.timeout == timedelta(seconds=30)


def test_the_guard_meets_before_every_collective_once_and_not_when_bypassed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(dist, "all_reduce", lambda *args, **kwargs: calls.append("all_reduce"))
    # a collective that runs another one inside (as all_gather_object does): one meeting for both
    monkeypatch.setattr(dist, "barrier", lambda *args, **kwargs: (calls.append("barrier"), dist.all_reduce(None)))
    fakes = (dist.all_reduce, dist.barrier)
    met: list[str] = []
    guard = CollectiveGuard(met.append)
    guard.install()
    try:
        dist.barrier()
        with guard.bypass():
            dist.all_reduce(None)
        dist.all_reduce(None)
    finally:
        guard.uninstall()
    assert calls == ["barrier", "all_reduce", "all_reduce", "all_reduce"]
    assert [m.split()[0] for m in met] == ["torch.distributed.barrier", "torch.distributed.all_reduce"]
    assert (dist.all_reduce, dist.barrier) == fakes  # uninstalled: the functions it found are back


def test_the_watchdog_judges_a_hung_peer_only_while_this_worker_is_stuck() -> None:
    judge = Judge(timeout_s=10.0)
    assert judge.verdict(0.0, own_stuck_s=0.0, progress={1: 5, 2: 7}, failure=None) is None
    # rank 1 keeps training, rank 2 stops; this worker is stuck in a collective
    assert judge.verdict(6.0, own_stuck_s=6.0, progress={1: 6, 2: 7}, failure=None) is None  # not long enough
    verdict = judge.verdict(11.0, own_stuck_s=11.0, progress={1: 7, 2: 7}, failure=None)
    assert verdict is not None and verdict.startswith("rank(s) [2] started no training batch for 10 s")
    # a worker that is not stuck never aborts, whatever its peers do
    assert Judge(timeout_s=10.0).verdict(50.0, own_stuck_s=0.5, progress={2: 7}, failure="rank 2 failed") is None


def test_the_watchdog_aborts_soon_after_a_peer_posted_its_failure(store: dist.TCPStore) -> None:
    peer = board(store, 1, world_size=2)
    progress = iter(range(1000))
    aborted: list[str] = []
    watchdog = Watchdog(board(store, 0, world_size=2), lambda: 3, timeout_s=60.0, abort=aborted.append, interval_s=0.05)
    watchdog.start()
    peer.post_progress(next(progress))
    peer.report(RuntimeError("CUDA out of memory"))
    watchdog.join(timeout=20)
    assert aborted == ["rank 1 failed with RuntimeError: CUDA out of memory"] == [watchdog.reason]
