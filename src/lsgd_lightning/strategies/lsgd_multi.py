"""Multi-leader Leader SGD (Teng et al., NeurIPS 2019, arXiv:1905.10395, Sec. "multi-leader"): a local leader per
group of workers (a node) and one global leader.

Workers form groups (the ranks of one node, or k consecutive ranks). After step t with t % local_tau == 0 each group
elects its *local leader* and, when t % tau == 0, all workers elect the *global leader*; from the weights before the
round (:func:`~lsgd_lightning.core.rules.multi_leader_pull`)::

    x_i <- x_i - local_pull_strength * (x_i - x_local(i)) - pull_strength * (x_i - x_global)     (both due)
    x_i <- x_i - local_pull_strength * (x_i - x_local(i))                                         (local only)

The global leader is the lowest score anywhere, hence also its group's local leader, so it does not move. Traffic:
scores are all-gathered once per round (P floats); the local leader's weights stay inside the group's process
group; the global leader's weights cross group boundaries once per group (to the rank holding the same position in
each other group, through a "column" process group) and then fan out inside each group. ``comm/bytes_intra`` and
``comm/bytes_inter`` count the two kinds separately (the score all-gather counts as inter-group).
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from ..core.flat import to_master
from ..core.rules import elect_leader, multi_leader_pull, squared_distance
from .checks import check_multi_leader_options
from .lsgd import LSGDStrategy


def default_local_tau(tau: int) -> int:
    """The largest divisor of ``tau`` that is at most ``tau // 4``: local rounds about 4x as often as global ones."""
    return max(d for d in range(1, max(1, tau // 4) + 1) if tau % d == 0)


class MultiLeaderLSGDStrategy(LSGDStrategy):
    """Multi-leader LSGD: every ``local_tau`` steps each group pulls toward its local leader, every ``tau`` steps
    everyone also pulls toward the global leader.

    Args:
        group_size: ``"node"`` (one group per node: Lightning's ``devices`` ranks of each of ``num_nodes`` nodes) or
            an int k (consecutive ranks in groups of k; must divide the world size).
        tau: optimizer steps between global rounds; a multiple of ``local_tau``.
        local_tau: optimizer steps between local rounds. Default: the largest divisor of ``tau`` not above
            ``tau // 4``.
        pull_strength: pull toward the global leader, in [0, 1].
        local_pull_strength: pull toward the local leader, in [0, 1]. Default: ``pull_strength``.
        **kwargs: :class:`~.lsgd.LSGDStrategy`'s ``tau``, ``pull_strength``, ``leader_window`` and the rest.

    ``overlap_steps`` and ``leader_broadcast='chain'`` are single-leader options and are refused. Registered as
    ``"lsgd_multi"`` and ``"lsgd_multi_spawn"`` with ``group_size="node"``; ``LSGDStrategy(group_size=...)`` builds one.
    """

    strategy_name: ClassVar[str] = "lsgd_multi"

    def __init__(
        self,
        group_size: int | str = "node",
        *,
        local_tau: int | None = None,
        local_pull_strength: float | None = None,
        overlap_steps: int = 0,
        leader_broadcast: str = "tree",
        **kwargs: Any,
    ) -> None:
        check_multi_leader_options(group_size, local_tau, local_pull_strength, overlap_steps, leader_broadcast)
        super().__init__(**kwargs)
        self.group_size = group_size
        self.local_tau = local_tau or default_local_tau(self.tau)
        self.local_pull_strength = self.pull_strength if local_pull_strength is None else float(local_pull_strength)
        if self.tau % self.local_tau != 0:
            raise ValueError(f"tau ({self.tau}) must be a multiple of local_tau ({self.local_tau}).")
        self.groups: list[list[int]] = []  # global ranks of each group
        self._row_group: Any = None  # this rank's group
        self._column_groups: list[Any] = []  # column j: the j-th rank of every group

    # ------------------------------------------------------------------------------------------------ groups
    def _resolved_group_size(self) -> int:
        return self.num_processes if self.group_size == "node" else int(self.group_size)

    @override
    def _check_world_size(self, world_size: int) -> None:
        size = self._resolved_group_size()
        if world_size % size != 0:
            raise ValueError(
                f"group_size={self.group_size!r} ({size} ranks per group) must divide the number of workers "
                f"({world_size} = num_nodes x devices)."
            )

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if not self.groups and self.world_size > 1:
            self._create_groups()

    def _create_groups(self) -> None:
        """One process group per worker group and one per column; every rank creates all of them, in one order."""
        size = self._resolved_group_size()
        self.groups = [list(range(start, start + size)) for start in range(0, self.world_size, size)]
        for ranks in self.groups:
            group = dist.new_group(ranks, timeout=self._timeout)
            if self.global_rank in ranks:
                self._row_group = group
        if len(self.groups) > 1:
            self._column_groups = [
                dist.new_group([ranks[j] for ranks in self.groups], timeout=self._timeout) for j in range(size)
            ]

    @override
    def _release_process_groups(self) -> bool:
        if not super()._release_process_groups():
            return False
        self._row_group, self._column_groups, self.groups = None, [], []
        return True

    def _group_of(self, rank: int) -> list[int]:
        return self.groups[rank // len(self.groups[0])]

    # ------------------------------------------------------------------------------------------------ rounds
    @override
    def _round_step(self, step: int) -> bool:
        return step % self.local_tau == 0

    @override
    def _comm_metrics(self) -> dict[str, float]:
        return self.comm.metrics(by_scope=True)

    @override
    def _gather_scores(self, scope: str | None = "inter") -> Tensor:
        return super()._gather_scores(scope)

    @override
    def _communication_round(self) -> dict[str, float] | None:
        scores = self._gather_scores()
        group = self._group_of(self.global_rank)
        local = elect_leader(scores[group[0] : group[-1] + 1])
        local_leader = None if local is None else group[local]
        global_due = self._steps % self.tau == 0
        global_leader = elect_leader(scores) if global_due else None
        if global_leader is None and global_due:
            rank_zero_warn(f"LSGD global round after step {self.steps} skipped: no finite training loss anywhere.")
        # Every rank knows every score, so all members of a group agree on which collectives to enter.
        metrics: dict[str, float] = {}
        local_flats = global_flats = None
        if local_leader is not None:
            local_flats = self._broadcast_flats(local_leader, self._row_group, scope="intra")
            metrics["lsgd/local_leader"] = float(local_leader)
        if global_leader is not None:
            global_flats = self._global_leader_flats(global_leader, local_flats)
            metrics.update({"lsgd/leader": float(global_leader), "lsgd/leader_score": float(scores[global_leader])})
        if local_flats is None and global_flats is None:
            return None  # no finite score in this rank's group, nor a global round
        if bool(torch.isnan(scores[self.global_rank])):  # diverged: take the best weights this round offers
            best = global_flats if global_flats is not None else local_flats
            assert best is not None
            self._reset_to(best, "global leader" if global_flats is not None else "local leader")
            return metrics
        local_distance, global_distance = self._pull_toward_leaders(local_flats, global_flats)
        if local_flats is not None:
            metrics["lsgd/dist_to_local_leader"] = local_distance
        if global_flats is not None:
            metrics["lsgd/dist_to_leader"] = global_distance
        return metrics

    def _pull_toward_leaders(
        self, local_flats: list[Tensor] | None, global_flats: list[Tensor] | None
    ) -> tuple[float, float]:
        """Both pulls from the weights before the round; integer buffers copied from the global (else local)
        leader. Returns the L2 distances to the local and to the global leader."""
        local_sq = torch.zeros((), dtype=torch.float64, device=self.root_device)
        global_sq = torch.zeros((), dtype=torch.float64, device=self.root_device)
        for index, bucket in enumerate(self.layout.buckets):
            local = None if local_flats is None else to_master(local_flats[index])
            global_ = None if global_flats is None else to_master(global_flats[index])
            if not bucket.floating:
                bucket.unpack(global_ if global_ is not None else local)
                continue
            own = to_master(bucket.pack())
            if local is not None:
                local_sq += squared_distance(own, local)
            if global_ is not None:
                global_sq += squared_distance(own, global_)
            moved = multi_leader_pull(own, local, global_, self.local_pull_strength, self.pull_strength)
            if not torch.equal(moved, own):  # a leader's move is exactly zero: keep it bit for bit
                bucket.unpack(moved)
        return float(local_sq.sqrt()), float(global_sq.sqrt())

    def _global_leader_flats(self, leader: int, local_flats: list[Tensor] | None) -> list[Tensor]:
        """The global leader's weights: across groups once per group (its column), then inside each group.

        In the leader's own group the local round already delivered them (the global leader is the lowest score
        anywhere, hence its group's local leader), so that group only takes part in the column broadcast.
        """
        size = len(self.groups[0])
        column = leader % size
        representative = self._group_of(self.global_rank)[column]
        if len(self.groups) > 1 and self.global_rank == representative:
            flats = self._broadcast_flats(leader, self._column_groups[column], scope="inter")
        else:
            flats = [bucket.empty() for bucket in self.layout.buckets]
        if leader in self._group_of(self.global_rank):
            assert local_flats is not None
            return local_flats
        if size == 1:
            return flats
        collectives = self.collectives
        return [collectives.broadcast(flat, src=representative, group=self._row_group, scope="intra") for flat in flats]
