"""The leader board of asynchronous LSGD's ``variant="board"`` (a variant of this package, not the paper's).

After every ``tau``-th of its own steps a worker runs one transaction on a board in the job's store
(:class:`~lsgd_lightning.core.board.StoreBoard`; the leader's copy is held in rank 0's process,
:mod:`~lsgd_lightning.core.holder`), under its lock: if it is the leader or its score beats the board's, it publishes
its weights as the leader's copy, else it pulls toward that copy. The board only ever holds finite
weights: a diverged leader resigns (its last finite copy stays), a diverged worker is reset to the copy. The record
``(version, rank, score)`` travels in the checkpoint shards, the copy in the main file.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from ..core.rules import elect_leader

_NO_LEADER = -1  # the board's rank before any worker posted a finite score (the initial weights are the copy)


class LeaderBoard:
    """The board variant's state, rounds and end, mixed into :class:`~.lsgd_async.AsyncLSGDStrategy` (which provides
    ``board``, ``layout``, ``round_score``, ``_pull_toward`` and ``_reset_to``)."""

    _resumed_leader: tuple[int, int, float] | None = None  # the record saved in the shard, until it is published
    board: Any
    layout: Any

    def read_leader(self) -> tuple[int, int, float]:
        """The board's (version, leader rank, leader score); rank -1 means the initial weights, score +inf."""
        version, rank, score = self.board.get_record("leader").split()
        return int(version), int(rank), float(score)

    def _write_leader(self, version: int, rank: int, score: float) -> None:
        self.board.set_record("leader", f"{version} {rank} {score!r}")

    def _publish_leader_copy(self, resumed_reference: list[Tensor] | None) -> None:
        """The first copy: the resumed main file's weights with their record, or this worker's initial weights."""
        self.board.put("leader", resumed_reference if resumed_reference is not None else self.layout.pack())
        leader = self._resumed_leader if resumed_reference is not None else None
        version, rank, score = leader if leader is not None else (0, _NO_LEADER, math.inf)
        self._write_leader(version, rank, score)

    def _board_round(self) -> dict[str, float]:
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
        metrics = {"lsgd/leader": float(leader), "lsgd/leader_score": leader_score}
        metrics["lsgd/board_version"] = float(version)
        if leader_copy is None:
            return {**metrics, "lsgd/dist_to_leader": 0.0}
        if diverged:
            self._reset_to(leader_copy, "leader")
            return metrics
        return {**metrics, "lsgd/dist_to_leader": self._pull_toward(own, leader_copy)}

    def _final_election(self) -> None:
        """Once every worker has finished: a last election over the final scores, and the winner publishes its
        current weights (also when it leads already: its copy may be up to tau steps old), so that the final sync
        hands every worker the newest leader weights. Nobody is pulled."""
        scores = self.collectives.all_gather(self.round_score().reshape(1).float())
        best = elect_leader(scores)
        version, _, _ = self.read_leader()
        if best is not None and best == self.global_rank:
            with self.board.locked():
                self.board.put("leader", self.layout.pack())
                self._write_leader(version + 1, best, float(scores[best]))
        self.barrier("lsgd_lightning.final_election")  # published before anyone reads

    def _leader_copy(self) -> list[Tensor]:
        with self.board.locked():
            return self.board.get("leader", like=self.layout.pack())

    def _restore_leader_record(self, leader: Any) -> None:
        self._resumed_leader = (int(leader[0]), int(leader[1]), float(leader[2])) if leader is not None else None
