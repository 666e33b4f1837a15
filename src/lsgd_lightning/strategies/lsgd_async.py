"""Asynchronous Leader SGD (Teng et al., NeurIPS 2019, Algorithm 1) as a Lightning strategy.

Every worker trains its own replica at its own pace; there is no global barrier per round. A *leader board* on the
job's store (:class:`~._board.StoreBoard`) holds the current leader: its rank, its score and a copy of its weights.
After every ``tau``-th of its own optimizer steps, worker i with score s_i (mean of its last ``leader_window``
training losses) runs one transaction under the board's lock::

    read the board: leader l, score s_l
    if i == l or s_i < s_l:   publish x_i as the leader's copy, the board now says (i, s_i)       [i leads]
    else:                     read the leader's copy x_l; after the lock:  x_i <- x_i - pull_strength * (x_i - x_l)

The leader refreshes its copy (and score) at each of its rounds, even when its score got worse; it keeps the lead
until another worker posts a strictly lower score. The pull is applied outside the optimizer (momentum never sees
it); integer buffers are copied from the leader's copy.

Consistency: board transactions are serialized by the lock, so a worker reads one complete copy, exactly as some
leader published it at the end of one of its rounds, and decides against the score published with it. The copy is
stale by up to the leader's ``tau`` steps since its last round (the synchronous ``lsgd`` pulls toward the leader's
weights of the same step). A copy is published only by a worker whose recent losses and weights are all finite, and
the board starts with the (identical) initial weights, so the board never hands out a non-finite leader. A worker
that diverges (non-finite loss or weights) resigns if it leads (its score becomes +inf; its last finite copy stays
until someone better posts) and is reset to the leader's copy with fresh optimizer state.

Communicated per round: about 20 bytes of record plus one model copy (4·d bytes for float32; d counts parameters
and buffers), uploaded by the leader or downloaded by the others, through the store served by the rank-0 process:
4·d / tau bytes per step, like ``lsgd``, but with no worker waiting for another. See :mod:`._asynchronous` for where
workers still meet (evaluation, checkpoints, Lightning's collectives, the end of training).

No multi-leader form: its point is to keep most traffic inside each node, but the board lives in one process
(rank 0's store), so local leader boards would still send every copy to and from node 0. Use the synchronous
``LSGDStrategy(group_size="node")`` for that.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor
from typing_extensions import override

from ..core.flat import to_master
from ..core.rules import elect_leader, leader_pull, squared_distance
from .asynchronous import AsynchronousStrategy
from .checks import check_fraction

_NO_LEADER = -1  # the board's rank before any worker posted a finite score (the initial weights are the copy)


class AsyncLSGDStrategy(AsynchronousStrategy):
    """Asynchronous Leader SGD: each worker, every ``tau`` of its own steps, posts its score and pulls toward the
    best worker on the leader board, without waiting for the others.

    Args:
        tau: a worker's optimizer steps between its rounds (>= 1).
        pull_strength: how far a worker moves toward the leader's copy per round, in [0, 1].
        leader_window: how many recent training losses make a worker's score.
        **kwargs: :class:`~.base.ReplicaStrategy`'s ``eval_on`` (evaluate the board's leader copy, or ``"local"``),
            ``final_sync``, ``bucket_cap_mb``, ``timeout``, ``start_method`` and Lightning's process arguments.

    Registered as ``"lsgd_async"`` (subprocess launcher) and ``"lsgd_async_spawn"`` (spawn launcher).
    """

    strategy_name: ClassVar[str] = "lsgd_async"
    reference_name: ClassVar[str] = "leader"
    _loss_window_arg: ClassVar[str] = "leader_window"
    _without_loss: ClassVar[str] = "this worker's score stays +inf (it cannot be elected)"

    def __init__(self, tau: int = 16, pull_strength: float = 0.1, leader_window: int = 10, **kwargs: Any) -> None:
        check_fraction("pull_strength", pull_strength)
        super().__init__(tau=tau, loss_window=leader_window, **kwargs)
        self.pull_strength = float(pull_strength)
        self._resumed_leader: tuple[int, int, float] | None = None  # the board's record saved in the shard

    # ------------------------------------------------------------------------------------------------ the board
    def read_leader(self) -> tuple[int, int, float]:
        """The board's (version, leader rank, leader score); rank -1 means the initial weights, score +inf."""
        version, rank, score = self.board.get_record("leader").split()
        return int(version), int(rank), float(score)

    def _write_leader(self, version: int, rank: int, score: float) -> None:
        self.board.set_record("leader", f"{version} {rank} {score!r}")

    @override
    def _publish_initial(self, resumed_reference: list[Tensor] | None) -> None:
        self.board.put("leader", resumed_reference if resumed_reference is not None else self.layout.pack())
        leader = self._resumed_leader if resumed_reference is not None else None
        version, rank, score = leader if leader is not None else (0, _NO_LEADER, math.inf)
        self._write_leader(version, rank, score)

    # ------------------------------------------------------------------------------------------------ a round
    @override
    def _communication_round(self) -> dict[str, float]:
        score = float(self.round_score())  # NaN: this worker diverged; +inf: no finite loss yet
        diverged = math.isnan(score)
        own = self.layout.pack()
        leader_copy: list[Tensor] | None = None
        with self.board.locked():
            version, leader, leader_score = self.read_leader()
            if not diverged and (leader == self.global_rank or score < leader_score):
                self.board.put("leader", own)
                version, leader, leader_score = version + 1, self.global_rank, score
                self._write_leader(version, leader, leader_score)
            else:
                if diverged and leader == self.global_rank:
                    version, leader_score = version + 1, math.inf  # resign; the last finite copy stays
                    self._write_leader(version, leader, leader_score)
                leader_copy = self.board.get("leader", like=own)
        metrics = {
            "lsgd/leader": float(leader),
            "lsgd/leader_score": leader_score,
            "lsgd/board_version": float(version),
        }
        if leader_copy is None:
            return {**metrics, "lsgd/dist_to_leader": 0.0}
        if diverged:
            self._reset_to(leader_copy, "leader")
            return metrics
        return {**metrics, "lsgd/dist_to_leader": self._pull_toward(own, leader_copy)}

    def _pull_toward(self, own: list[Tensor], leader_copy: list[Tensor]) -> float:
        """x <- x - pull_strength * (x - x_leader) on floating buckets; integer buckets copied. Returns ||x - x_l||."""
        squared = torch.zeros((), dtype=torch.float64, device=self.root_device)
        for bucket, mine, theirs in zip(self.layout.buckets, own, leader_copy):
            if bucket.floating:
                mine, theirs = to_master(mine), to_master(theirs)  # float32 for a half-precision model
                squared += squared_distance(mine, theirs)
                bucket.unpack(leader_pull(mine, theirs, self.pull_strength))
            else:
                bucket.unpack(theirs)
        return math.sqrt(float(squared))

    @override
    def _settle_board(self) -> None:
        """A last, synchronous election once every worker has finished.

        Without it the board may end on a slow worker: when the fast ones have finished it leads alone and keeps
        refreshing its copy however much its score worsens. All workers all-gather their final scores; if the best
        finite one is not the board's leader, that worker publishes its weights (no worker is pulled).
        """
        scores = self.collectives.all_gather(self.round_score().reshape(1).float())
        best = elect_leader(scores)
        version, leader, _ = self.read_leader()
        if best is not None and best != leader and best == self.global_rank:
            with self.board.locked():
                self.board.put("leader", self.layout.pack())
                self._write_leader(version + 1, best, float(scores[best]))
        self.barrier("lsgd_lightning.final_election")  # published before anyone reads

    @override
    def _reference_weights(self) -> list[Tensor]:
        with self.board.locked():
            return self.board.get("leader", like=self.layout.pack())

    # ------------------------------------------------------------------------------------------------ checkpoints
    @override
    def _extra_state_dict(self) -> dict[str, Any]:
        # Saved after the rendezvous, when the board is still: every shard holds the same record.
        if self._board is None:
            return {}
        version, rank, score = self.read_leader()
        return {"leader": (version, rank, score)}

    @override
    def _load_extra_state_dict(self, state: dict[str, Any]) -> None:
        leader = state.get("leader")
        self._resumed_leader = (int(leader[0]), int(leader[1]), float(leader[2])) if leader is not None else None
