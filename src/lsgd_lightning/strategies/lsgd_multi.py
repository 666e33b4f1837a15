"""Multi-leader Leader SGD (Teng et al., NeurIPS 2019, arXiv:1905.10395, Sec. "multi-leader"): a local leader per
group of workers (a node) and one global leader.

Workers form groups (the ranks of one node, or k consecutive ranks). After step t with t % local_tau == 0 each group
elects its *local leader* and, when t % tau == 0, all workers elect the *global leader*. With λ_L =
``local_pull_strength``, λ_G = ``pull_strength`` and the leaders' weights from before the round::

    local only:                            x_i <- x_i - λ_L (x_i - x_local(i))
    both, pull_order="sequential":         x_i' = x_i - λ_L (x_i - x_local(i));  x_i <- x_i' - λ_G (x_i' - x_global)
    both, pull_order="simultaneous":       x_i <- x_i - λ_L (x_i - x_local(i)) - λ_G (x_i - x_global)

(:func:`~lsgd_lightning.core.rules.sequential_multi_leader_pull`, :func:`~lsgd_lightning.core.rules.multi_leader_pull`).
The default is ``"sequential"`` because it is what the paper's Algorithm 1 and the authors' code do (the local pull,
then the global pull applied to its result), so it is the rule behind the paper's multi-leader results; it is also a
convex combination of the worker and its two leaders, weights (1-λ_G)(1-λ_L), (1-λ_G)λ_L and λ_G, for any strengths
in [0, 1]. The simultaneous form (the poster's eq. 2, one gradient step on the penalized objective) agrees with it to
first order in the strengths (they differ by λ_L λ_G (x_i - x_local(i))) and overshoots both leaders when
λ_L + λ_G > 1, which is refused when the strategy is constructed.

The global leader is the lowest score anywhere, hence also its group's local leader, so it does not move (in either
order); the ``*/dist_to_*`` metrics are distances from the weights before the round. Traffic:
scores are all-gathered once per round (P floats); the local leader's weights stay inside the group's process
group; the global leader's weights cross group boundaries once per group (to the rank holding the same position in
each other group, through a "column" process group) and then fan out inside each group. ``comm/bytes_intra`` and
``comm/bytes_inter`` count the two kinds separately (the score all-gather counts as inter-group).

The groups and the round are :class:`LeaderGroups`, which the asynchronous form (Algorithm 1 with ``group_size``,
:class:`~.lsgd_async.AsyncLSGDStrategy`) shares: there the rounds fire on the job's total step count instead.
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
from ..core.rules import elect_leader, multi_leader_pull, sequential_multi_leader_pull, squared_distance
from .base import ReplicaStrategy
from .checks import check_multi_leader_options, check_pull_order
from .election import LeaderElection
from .lsgd import LSGDStrategy


def default_local_tau(tau: int) -> int:
    """The largest divisor of ``tau`` that is at most ``tau // 4``: local rounds about 4x as often as global ones."""
    return max(d for d in range(1, max(1, tau // 4) + 1) if tau % d == 0)


class LeaderGroups(LeaderElection, ReplicaStrategy):
    """Mixin: multi-leader LSGD's groups and its round, shared by :class:`MultiLeaderLSGDStrategy` (rounds every
    ``local_tau`` steps of each worker) and :class:`~.lsgd_async.AsyncLSGDStrategy` with ``group_size`` (rounds every
    P·``local_tau`` steps of the whole job). The host sets ``tau`` and ``pull_strength`` and calls
    :meth:`_configure_groups` in its constructor (``group_size=None``: one group, nothing here is used) and
    :meth:`_create_groups` in ``setup``; a round is :meth:`_multi_leader_round`.
    """

    tau: int
    pull_strength: float
    group_size: int | str | None = None

    def _configure_groups(
        self, group_size: int | str | None, local_tau: int | None, local_pull_strength: float | None, pull_order: str
    ) -> None:
        """Keep the group settings (checked by :func:`~.checks.check_multi_leader_options` first): ``local_tau``
        defaults to :func:`default_local_tau`, ``local_pull_strength`` to ``pull_strength``; ``tau`` must be a
        multiple of ``local_tau``; the pull order is checked against both strengths."""
        self.group_size = group_size
        self.local_tau = local_tau or default_local_tau(self.tau)
        self.local_pull_strength = self.pull_strength if local_pull_strength is None else float(local_pull_strength)
        if self.tau % self.local_tau != 0:
            raise ValueError(f"tau ({self.tau}) must be a multiple of local_tau ({self.local_tau}).")
        check_pull_order(pull_order, self.local_pull_strength, self.pull_strength)
        self.pull_order = pull_order
        self.groups: list[list[int]] = []  # global ranks of each group
        self._row_group: Any = None  # this rank's group
        self._column_groups: list[Any] = []  # column j: the j-th rank of every group

    # ------------------------------------------------------------------------------------------------ groups
    def _resolved_group_size(self) -> int:
        return self.num_processes if self.group_size == "node" else int(self.group_size)

    @override
    def _check_world_size(self, world_size: int) -> None:
        super()._check_world_size(world_size)
        if self.group_size is None:
            return
        size = self._resolved_group_size()
        if world_size % size != 0:
            raise ValueError(
                f"group_size={self.group_size!r} ({size} ranks per group) must divide the number of workers "
                f"({world_size} = num_nodes x devices)."
            )

    def _create_groups(self) -> None:
        """One process group per worker group and one per column; every rank creates all of them, in one order
        (once, with groups and several workers)."""
        if self.group_size is None or self.groups or self.world_size == 1:
            return
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
        if self.group_size is not None:
            self._row_group, self._column_groups, self.groups = None, [], []
        return True

    def _group_of(self, rank: int) -> list[int]:
        return self.groups[rank // len(self.groups[0])]

    # ------------------------------------------------------------------------------------------------ rounds
    def _multi_leader_round(self, scores: Tensor, global_due: bool, when: str) -> dict[str, float] | None:
        """One round, given every worker's score (all-gathered, not all NaN): each group's local leader's weights to
        its group, and (``global_due``) the global leader's to everyone; then both pulls in ``pull_order``. A
        diverged worker is reset to the global (else local) leader. ``when`` names the round in warnings."""
        group = self._group_of(self.global_rank)
        local = elect_leader(scores[group[0] : group[-1] + 1])
        local_leader = None if local is None else group[local]
        global_leader = elect_leader(scores) if global_due else None
        if global_leader is None and global_due:
            rank_zero_warn(f"LSGD global round {when} skipped: no finite training loss anywhere.")
        # Every rank knows every score, so all members of a group agree on which collectives to enter.
        metrics: dict[str, float] = {}
        local_flats = global_flats = None
        if local_leader is not None:
            local_flats = self._leader_flats(local_leader, self._row_group, scope="intra")
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
        """Both pulls in ``pull_order`` toward the leaders' weights from before the round; integer buffers copied
        from the global (else local) leader. Returns the L2 distances (before the round) to the local and global
        leader."""
        pull = sequential_multi_leader_pull if self.pull_order == "sequential" else multi_leader_pull
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
            moved = pull(own, local, global_, self.local_pull_strength, self.pull_strength)
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
            flats = self._leader_flats(leader, self._column_groups[column], scope="inter")
        else:
            flats = [bucket.empty() for bucket in self.layout.buckets]
        if leader in self._group_of(self.global_rank):
            assert local_flats is not None
            return local_flats
        if size == 1:
            return flats
        collectives = self.collectives
        return [collectives.broadcast(flat, src=representative, group=self._row_group, scope="intra") for flat in flats]


class MultiLeaderLSGDStrategy(LeaderGroups, LSGDStrategy):
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
        pull_order: on rounds with both pulls, ``"sequential"`` (default: the local pull, then the global pull on
            its result, as Algorithm 1 and the authors' code) or ``"simultaneous"`` (both from the weights before
            the round, the poster's eq. 2; needs ``local_pull_strength + pull_strength <= 1``).
        **kwargs: :class:`~.lsgd.LSGDStrategy`'s ``tau``, ``pull_strength``, ``leader_window``, ``eval_on``
            (``"leader"``: the global leader; ``"average"``: the mean of all P workers, what the paper reports),
            ``bn_recalibration_batches`` and the rest.

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
        pull_order: str = "sequential",
        overlap_steps: int = 0,
        leader_broadcast: str = "tree",
        **kwargs: Any,
    ) -> None:
        check_multi_leader_options(group_size, local_tau, local_pull_strength, overlap_steps, leader_broadcast)
        super().__init__(**kwargs)
        self._configure_groups(group_size, local_tau, local_pull_strength, pull_order)

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        self._create_groups()

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
        return self._multi_leader_round(self._gather_scores(), self._steps % self.tau == 0, f"after step {self.steps}")
