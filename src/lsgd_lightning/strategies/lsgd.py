"""Leader SGD (Teng et al., NeurIPS 2019, arXiv:1905.10395) as a Lightning strategy, single- or multi-leader.

Each worker i trains its own replica x_i with its own optimizer on its own data shard. Its *score* is the mean of
its last ``leader_window`` training losses (+inf if non-finite).

Single leader (``group_size=None``). After every ``tau``-th optimizer step:

1. all workers all-gather their scores (P floats) and elect the leader l = argmin score (ties: lowest rank);
2. the leader broadcasts its parameters and floating-point buffers as flat buffers (d values);
3. every other worker pulls toward it, outside the optimizer (momentum never sees the pull)::

       x_i <- x_i - pull_strength * (x_i - x_l)

   integer buffers are copied from the leader, and the leader itself does not move.

Communicated per round, per worker: 4·P bytes of scores plus the model (4·d bytes for float32), so
(4·d + 4·P) / tau bytes per optimizer step on average, against 4·d per step for data-parallel SGD.
If every score is non-finite the round is skipped with a warning.

Multi-leader (``group_size="node"`` or an int k). Workers form groups (the ranks of one node, or k consecutive
ranks). After step t with t % local_tau == 0 each group elects its *local leader* and, when t % tau == 0, all workers
elect the *global leader*; from the weights before the round::

    x_i <- x_i - local_pull_strength * (x_i - x_local(i)) - pull_strength * (x_i - x_global)     (both due)
    x_i <- x_i - local_pull_strength * (x_i - x_local(i))                                         (local only)

The global leader is the lowest score anywhere, hence also its group's local leader, so it does not move. Traffic:
scores are all-gathered once per round (P floats); the local leader's weights stay inside the group's process
group; the global leader's weights cross group boundaries once per group (to the rank holding the same position in
each other group, through a "column" process group) and then fan out inside each group. ``comm/bytes_intra`` and
``comm/bytes_inter`` count the two kinds separately (the score all-gather counts as inter-group).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.strategies import _StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from ._flat import Bucket
from ._registration import register_launcher_variants
from .periodic import PeriodicCommunicationStrategy, _check_int


def elect_leader(scores: Tensor) -> int | None:
    """Index of the lowest finite score (ties: the lowest index), or ``None`` if no score is finite."""
    finite = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, math.inf))
    if not bool(torch.isfinite(finite).any()):
        return None
    return int(torch.argmin(finite))  # argmin returns the first minimal index


def default_local_tau(tau: int) -> int:
    """The largest divisor of ``tau`` that is at most ``tau // 4``: local rounds about 4x as often as global ones."""
    return max(d for d in range(1, max(1, tau // 4) + 1) if tau % d == 0)


class LSGDStrategy(PeriodicCommunicationStrategy):
    """Leader SGD: every ``tau`` steps, pull all workers toward the worker with the lowest recent training loss.

    Args:
        tau: optimizer steps between (global) rounds (>= 1).
        pull_strength: how far each worker moves toward the (global) leader per round, in [0, 1] (λ in the paper;
            0 is independent local SGD, 1 copies the leader).
        leader_window: number of recent training losses averaged into a worker's score (>= 1).
        eval_on: ``"leader"`` (validation/test see the leader's weights on every rank) or ``"local"``.
        final_sync: when ``fit`` ends, every worker takes the leader's weights (a last election).
        group_size: ``None`` (one leader), ``"node"`` (one group per node: Lightning's ``devices`` ranks of each of
            ``num_nodes`` nodes) or an int k (consecutive ranks in groups of k; must divide the world size).
        local_tau: optimizer steps between local rounds; must divide ``tau``. Default: the largest divisor of
            ``tau`` not above ``tau // 4``. Only with ``group_size``.
        local_pull_strength: pull toward the local leader, in [0, 1]. Default: ``pull_strength``. Only with
            ``group_size``.
        bucket_cap_mb: largest flat buffer per collective, in MiB.
        **ddp_kwargs: process-group arguments of Lightning's ``DDPStrategy`` (``start_method``, ``timeout``,
            ``cluster_environment``, ``process_group_backend``, ...).

    Registered as ``"lsgd"`` (subprocess launcher), ``"lsgd_spawn"`` (spawn launcher), and ``"lsgd_multi"`` /
    ``"lsgd_multi_spawn"`` (``group_size="node"``).
    """

    strategy_name: ClassVar[str] = "lsgd"
    reference_name: ClassVar[str] = "leader"
    _loss_window_arg: ClassVar[str] = "leader_window"

    def __init__(
        self,
        tau: int = 16,
        pull_strength: float = 0.1,
        leader_window: int = 10,
        eval_on: str = "leader",
        final_sync: bool = True,
        group_size: int | str | None = None,
        local_tau: int | None = None,
        local_pull_strength: float | None = None,
        bucket_cap_mb: float = 25.0,
        **ddp_kwargs: Any,
    ) -> None:
        _check_fraction("pull_strength", pull_strength)
        if group_size is None:
            for name, value in (("local_tau", local_tau), ("local_pull_strength", local_pull_strength)):
                if value is not None:
                    raise ValueError(f"{name} needs group_size ('node' or an int): without groups there is one leader.")
        else:
            is_count = isinstance(group_size, int) and not isinstance(group_size, bool) and group_size >= 1
            if group_size != "node" and not is_count:
                raise ValueError(f"group_size must be None, 'node' or an integer >= 1, got {group_size!r}.")
            if local_tau is not None:
                _check_int("local_tau", local_tau, minimum=1)
            if local_pull_strength is not None:
                _check_fraction("local_pull_strength", local_pull_strength)
        super().__init__(
            tau=tau,
            eval_on=eval_on,
            final_sync=final_sync,
            loss_window=leader_window,
            bucket_cap_mb=bucket_cap_mb,
            **ddp_kwargs,
        )
        self.pull_strength = float(pull_strength)
        self.group_size = group_size
        self.local_tau = None if group_size is None else (local_tau or default_local_tau(tau))
        self.local_pull_strength = (
            None if group_size is None else float(pull_strength if local_pull_strength is None else local_pull_strength)
        )
        if self.local_tau is not None and tau % self.local_tau != 0:
            raise ValueError(f"tau ({tau}) must be a multiple of local_tau ({self.local_tau}).")
        self.groups: list[list[int]] = []  # global ranks of each group (multi-leader only)
        self._row_group: Any = None  # this rank's group
        self._column_groups: list[Any] = []  # column j: the j-th rank of every group

    @property
    def leader_window(self) -> int:
        return self.loss_window

    @property
    def multi_leader(self) -> bool:
        return self.group_size is not None

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        super().register_strategies(strategy_registry)
        register_launcher_variants(strategy_registry, cls, "lsgd_multi", group_size="node")

    # ------------------------------------------------------------------------------------------------------------
    # Groups
    # ------------------------------------------------------------------------------------------------------------
    def _resolved_group_size(self, world_size: int) -> int:
        return self.num_processes if self.group_size == "node" else int(self.group_size)  # type: ignore[arg-type]

    def _check_world_size(self, world_size: int) -> None:
        if not self.multi_leader:
            return
        size = self._resolved_group_size(world_size)
        if world_size % size != 0:
            raise ValueError(
                f"group_size={self.group_size!r} ({size} ranks per group) must divide the number of workers "
                f"({world_size} = num_nodes x devices)."
            )

    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if self.multi_leader and not self.groups and self.world_size > 1:
            self._create_groups()

    def _create_groups(self) -> None:
        """One process group per worker group and one per column; every rank creates all of them, in one order."""
        size = self._resolved_group_size(self.world_size)
        self.groups = [list(range(start, start + size)) for start in range(0, self.world_size, size)]
        for ranks in self.groups:
            group = dist.new_group(ranks, timeout=self._timeout)
            if self.global_rank in ranks:
                self._row_group = group
        if len(self.groups) > 1:
            self._column_groups = [
                dist.new_group([ranks[j] for ranks in self.groups], timeout=self._timeout) for j in range(size)
            ]

    def _group_of(self, rank: int) -> list[int]:
        return self.groups[rank // len(self.groups[0])]

    # ------------------------------------------------------------------------------------------------------------
    # Rounds
    # ------------------------------------------------------------------------------------------------------------
    def _round_due(self, step: int) -> bool:
        return step % (self.local_tau or self.tau) == 0

    def _comm_metrics(self) -> dict[str, float]:
        return self.comm.metrics(by_scope=self.multi_leader)

    def _gather_scores(self) -> Tensor:
        """Every worker's round score (NaN: diverged); raises on every rank alike if all workers diverged."""
        scope = "inter" if self.multi_leader else None
        scores = self.collectives.all_gather(self.round_score().float().reshape(1), scope=scope)
        if bool(torch.isnan(scores).all()):
            self._raise_all_diverged()
        return scores

    def _broadcast_flats(self, src: int, group: Any = None, scope: str | None = None) -> list[Tensor]:
        """``src``'s packed weights on every rank of ``group`` (``src`` sends its own)."""
        collectives = self.collectives
        flats = []
        for bucket in self.layout.buckets:
            flat = bucket.pack() if self.global_rank == src else bucket.empty()
            flats.append(collectives.broadcast(flat, src=src, group=group, scope=scope))
        return flats

    def _communication_round(self) -> dict[str, float] | None:
        if self.multi_leader:
            return self._multi_leader_round()
        scores = self._gather_scores()
        leader = elect_leader(scores)
        if leader is None:
            rank_zero_warn(f"LSGD round after step {self.steps} skipped: no worker has a finite training loss.")
            return None
        leader_flats = self._broadcast_flats(leader)
        metrics = {"lsgd/leader": float(leader), "lsgd/leader_score": float(scores[leader])}
        if bool(torch.isnan(scores[self.global_rank])):
            self._reset_to(leader_flats, "leader")
            return metrics
        metrics["lsgd/dist_to_leader"] = self._pull([(leader_flats, self.pull_strength)], copy_from=0)[0]
        return metrics

    def _multi_leader_round(self) -> dict[str, float] | None:
        scores = self._gather_scores()
        group = self._group_of(self.global_rank)
        local = elect_leader(scores[group[0] : group[-1] + 1])
        local_leader = None if local is None else group[local]
        global_leader = elect_leader(scores) if self._steps % self.tau == 0 else None
        if global_leader is None and self._steps % self.tau == 0:
            rank_zero_warn(f"LSGD global round after step {self.steps} skipped: no finite training loss anywhere.")
        # Every rank knows every score, so all members of a group agree on which collectives to enter.
        pulls: list[tuple[list[Tensor], float]] = []
        metrics: dict[str, float] = {}
        local_flats = None
        if local_leader is not None:
            local_flats = self._broadcast_flats(local_leader, self._row_group, scope="intra")
            pulls.append((local_flats, float(self.local_pull_strength)))  # type: ignore[arg-type]
            metrics["lsgd/local_leader"] = float(local_leader)
        if global_leader is not None:
            pulls.append((self._global_leader_flats(global_leader, local_flats), self.pull_strength))
            metrics.update({"lsgd/leader": float(global_leader), "lsgd/leader_score": float(scores[global_leader])})
        if not pulls:
            return None  # no finite score in this rank's group, nor a global round
        if bool(torch.isnan(scores[self.global_rank])):  # diverged: take the best weights this round offers
            self._reset_to(pulls[-1][0], "global leader" if global_leader is not None else "local leader")
            return metrics
        distances = self._pull(pulls, copy_from=len(pulls) - 1)
        if local_leader is not None:
            metrics["lsgd/dist_to_local_leader"] = distances[0]
        if global_leader is not None:
            metrics["lsgd/dist_to_leader"] = distances[-1]
        return metrics

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

    def _pull(self, targets: list[tuple[list[Tensor], float]], copy_from: int) -> list[float]:
        """x <- x - Σ_k strength_k (x - target_k), all from the weights before the round.

        Integer buffers are copied from ``targets[copy_from]``. Returns the L2 distance to each target.
        """
        squared = [torch.zeros((), dtype=torch.float64, device=self.root_device) for _ in targets]
        for index, bucket in enumerate(self.layout.buckets):
            target_flats = [flats[index] for flats, _ in targets]
            if not bucket.floating:
                bucket.unpack(target_flats[copy_from])
                continue
            own = bucket.pack()
            moved = own.clone()
            for k, (target, (_, strength)) in enumerate(zip(target_flats, targets)):
                toward = target - own
                squared[k] += toward.double().square().sum()
                moved.add_(toward, alpha=strength)
            _unpack_if_moved(bucket, own, moved)
        return [math.sqrt(float(s)) for s in squared]

    def _reference_weights(self) -> list[Tensor]:
        leader = elect_leader(self._gather_scores())
        if leader is None:
            rank_zero_warn("No worker has a finite training loss; rank 0 stands in as the leader.")
            leader = 0
        return self._broadcast_flats(leader)


def _unpack_if_moved(bucket: Bucket, before: Tensor, after: Tensor) -> None:
    # The leader's "move" is exactly zero; skipping the copy keeps it bit-for-bit where it was.
    if not torch.equal(before, after):
        bucket.unpack(after)


def _check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.")
