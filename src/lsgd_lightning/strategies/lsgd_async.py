"""Asynchronous Leader SGD (Teng et al., NeurIPS 2019, Algorithm 1) as a Lightning strategy.

Every worker trains at its own pace; the job counts everybody's optimizer steps on its store. ``variant`` chooses
when a round happens and who takes part:

``"algorithm1"`` (default, the paper's Algorithm 1). A round fires each time the *total* number of optimizer steps of
all P workers reaches a multiple of P·tau (fast workers contribute more steps between rounds). Every worker joins
every round, at its next step boundary (or while it waits anywhere: at a meeting point, at the end of its data), so
a fast worker waits for the others at most one of their steps. At a round the leader is elected over all workers'
current scores (mean of the last ``leader_window`` training losses) and every other worker is pulled::

    x_i <- x_i - pull_strength * (x_i - x_l)          (a collective round, as in the synchronous ``lsgd``)

At round k the workers' step counts add up to k·P·tau, up to one step per worker (who joined a little later). A worker
that has finished its steps keeps joining rounds until every worker has finished.

Multi-leader form (``group_size``, ``"algorithm1"`` only; Algorithm 1 with local leaders, the paper's multi-leader
setting): workers form groups as in the synchronous ``lsgd_multi`` (``"node"`` or k consecutive ranks). Both periods
are on the job's total count: a *local* round fires each time it reaches a multiple of P·``local_tau``, a *global*
round each time it reaches a multiple of P·tau (tau a multiple of ``local_tau``, so a global round always coincides
with a local one). Every worker joins every round, in firing order. With λ_L = ``local_pull_strength``,
λ_G = ``pull_strength``, leaders elected over the current scores (the local one within the group) and their weights
from before the round::

    local round:                      x_i <- x_i - λ_L (x_i - x_local(i))
    both, pull_order="sequential":    x_i' = x_i - λ_L (x_i - x_local(i));  x_i <- x_i' - λ_G (x_i' - x_global)
    both, pull_order="simultaneous":  x_i <- x_i - λ_L (x_i - x_local(i)) - λ_G (x_i - x_global)   (poster's eq. 2)

The default is the sequential order of Algorithm 1 and the authors' code; the simultaneous one needs λ_L + λ_G <= 1
(:class:`~.lsgd_multi.MultiLeaderLSGDStrategy` explains both; the round is its
:meth:`~.lsgd_multi.LeaderGroups._multi_leader_round`). At local round k the step counts add up to k·P·local_tau,
at global round g to g·P·tau (up to one step per worker). Evaluation, checkpoints and the final sync use the global
leader (or, ``eval_on="average"``, all P workers' mean).

``"board"`` (a variant of this package, not the paper's). After every ``tau``-th of its *own* steps a worker runs one
transaction on a leader board on the job's store (:class:`~lsgd_lightning.core.board.StoreBoard`), under its lock: if
it is the leader or its score beats the board's, it publishes its weights as the leader's copy, else it pulls toward
that copy. Only the worker whose round it is moves, toward a copy up to the leader's ``tau`` steps old, and nobody
ever waits for a round. The board only ever holds finite weights (a diverged leader resigns; a diverged worker is reset
to the copy). Bytes: one model copy up or down per round, to or from rank 0's process, which holds the copy
(``weight_transport``: by RPC, or as values on the store; the record and the lock are on the store).

Both end with every worker holding the newest leader weights (``final_sync``): a last election over all workers'
final scores, the winner's current weights to everyone.

``eval_on="average"`` (``"algorithm1"`` only) evaluates, checkpoints (main file) and final-syncs the workers'
average instead, what every LSGD figure of the paper reports, optionally with re-estimated BatchNorm statistics
(``bn_recalibration_batches``, :mod:`.recalibration`). It is computed where every worker is present (evaluation,
checkpoints and the end are meeting points), so it is exactly the mean of all workers' current weights. The board
variant refuses it: its checkpoint's main file must hold the board's leader copy, from which a resume restarts the
board, and that copy is not any worker's current weights. See :mod:`.asynchronous` for where workers meet (evaluation,
checkpoints, Lightning's collectives, the end).
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from ..core.flat import pull_buckets
from ..core.rules import elect_leader
from .asynchronous import AsynchronousStrategy
from .checks import check_async_groups, check_choice, check_fraction, check_multi_leader_options
from .leader_board import LeaderBoard
from .lsgd_multi import LeaderGroups

VARIANTS = ("algorithm1", "board")


class AsyncLSGDStrategy(LeaderGroups, LeaderBoard, AsynchronousStrategy):
    """Asynchronous Leader SGD: rounds triggered by the job's total step count (Algorithm 1; with ``group_size``
    local and global rounds, each on that count), or (``variant="board"``) a leader board each worker visits every
    ``tau`` of its own steps.

    Args:
        tau: rounds every P·tau steps of all workers together (``"board"``: every tau of a worker's own steps).
        pull_strength: how far a worker moves toward the leader per round, in [0, 1].
        leader_window: how many recent training losses make a worker's score.
        variant: ``"algorithm1"`` (the paper's) or ``"board"`` (this package's variant).
        group_size: ``None`` (one leader), or ``"node"`` / an int k (groups as in ``lsgd_multi``): the
            multi-leader Algorithm 1, ``variant="algorithm1"`` only.
        local_tau: with groups, local rounds every P·local_tau steps of the job (tau must be a multiple). Default:
            the largest divisor of tau not above tau // 4.
        local_pull_strength: with groups, the pull toward the local leader, in [0, 1]. Default: ``pull_strength``.
        pull_order: with groups, on rounds with both pulls: ``"sequential"`` (default, Algorithm 1: the local pull,
            then the global pull on its result) or ``"simultaneous"`` (the poster's eq. 2; needs
            ``local_pull_strength + pull_strength <= 1``).
        bn_recalibration_batches: with ``eval_on="average"``, re-estimate the average's BatchNorm statistics on
            this many of each rank's training batches before it is evaluated, saved or final-synced (0: off).
        weight_transport, rpc_options: ``variant="board"``: how the leader's copy travels to and from rank 0's
            process, which holds it (``"rpc"``, default, or ``"store"``; see
            :class:`~.asynchronous.AsynchronousStrategy`). Algorithm 1 moves weights by collectives.
        **kwargs: :class:`~.base.ReplicaStrategy`'s ``eval_on`` (``"leader"``; ``"average"``: all workers' mean
            weights, ``"algorithm1"`` only; or ``"local"``), ``final_sync``, ``bucket_cap_mb``, ``timeout``,
            ``start_method`` and Lightning's process arguments.

    Registered as ``"lsgd_async"`` (subprocess launcher) and ``"lsgd_async_spawn"`` (spawn launcher).
    """

    strategy_name: ClassVar[str] = "lsgd_async"

    def __init__(
        self,
        tau: int = 16,
        pull_strength: float = 0.1,
        leader_window: int = 10,
        variant: str = "algorithm1",
        bn_recalibration_batches: int = 0,
        group_size: int | str | None = None,
        local_tau: int | None = None,
        local_pull_strength: float | None = None,
        pull_order: str | None = None,
        **kwargs: Any,
    ) -> None:
        check_fraction("pull_strength", pull_strength)
        check_choice("variant", variant, VARIANTS)
        if variant == "board" and kwargs.get("eval_on") == "average":
            raise ValueError(
                "eval_on='average' needs variant='algorithm1': the board variant's checkpoint must hold the board's "
                "leader copy (a resume restarts the board from it), which is not the workers' average. Use "
                "eval_on='leader' or 'local' with variant='board'."
            )
        given = {"local_tau": local_tau, "local_pull_strength": local_pull_strength, "pull_order": pull_order}
        check_async_groups(variant, group_size, [name for name, value in given.items() if value is not None])
        if group_size is not None:
            check_multi_leader_options(group_size, local_tau, local_pull_strength, 0, "tree")
        super().__init__(tau=tau, loss_window=leader_window, **kwargs)
        self._accept_bn_recalibration(bn_recalibration_batches)
        self.pull_strength = float(pull_strength)
        self.variant = variant
        self._configure_groups(group_size, local_tau, local_pull_strength, pull_order or "sequential")
        self.rounds_joined = 0  # algorithm1: global rounds this worker took part in (the job's round number)
        self.local_rounds_joined = 0  # algorithm1 with groups: local rounds (with a global one or not)
        self.round_history: list[dict[str, float]] = []  # algorithm1: per round, what this worker saw (tests, logs)

    # ------------------------------------------------------------------------------------------------ algorithm 1
    @override
    def _prepare_board(self) -> None:
        if self.variant == "algorithm1":  # the job's step count goes on from the steps every worker brings along
            self.board.add("steps", self._steps)

    @override
    def _after_local_step(self) -> None:
        if self.variant == "board":
            return super()._after_local_step()
        if self.world_size == 1:
            return
        job_steps = self.board.add("steps", 1)
        assert self.lightning_module is not None
        if self.lightning_module.automatic_optimization:
            self._join_due_rounds(job_steps)
        else:
            self._pending_rounds = 1  # after training_step has returned its loss (see PeriodicStrategy)

    @override
    def _run_pending_rounds(self) -> None:
        if self.variant == "board":
            return super()._run_pending_rounds()
        if self._pending_rounds:
            self._pending_rounds = 0
            self._join_due_rounds(self.board.add("steps", 0))

    @override
    def _while_waiting(self) -> None:
        if self.variant == "algorithm1":
            self._join_due_rounds(self.board.add("steps", 0), log=False)  # Lightning may allow no logging here

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._create_groups()  # every rank, in one order, before the guard wraps torch.distributed
        super().setup(trainer)

    def _join_due_rounds(self, job_steps: int, log: bool = True) -> None:
        """Join, in firing order, every round that has fired and this worker has not joined yet: a global round per
        P·tau steps of the job and, with groups, a local round per P·local_tau steps (tau is a multiple of
        local_tau, so a global round always comes with a local one: they run as one round, both pulls in
        ``pull_order``). Idempotent: a round joined while waiting is not joined again."""
        period = self.world_size * (self.tau if self.group_size is None else self.local_tau)
        joined = self.rounds_joined if self.group_size is None else self.local_rounds_joined
        for _ in range(job_steps // period - joined):
            self._run_round(self._global_round, log=log)

    def _global_round(self) -> dict[str, float] | None:
        """Algorithm 1's distributed step: every worker elects the leader(s) over all current scores and moves."""
        with self._guard.bypass():  # every worker takes part: no meeting first (it could start the next round)
            return self._leader_round()

    def _leader_round(self) -> dict[str, float] | None:
        scores = self.collectives.all_gather(self.round_score().float().reshape(1))
        if bool(torch.isnan(scores).all()):
            self._raise_all_diverged()
        if self.group_size is not None:
            return self._groups_round(scores)
        self.rounds_joined += 1
        record = {"lsgd/round": float(self.rounds_joined), "lsgd/own_steps": float(self._steps)}
        leader = elect_leader(scores)
        if leader is None:
            rank_zero_warn(f"LSGD round {self.rounds_joined} skipped: no worker has a finite training loss.")
            self.round_history.append(record)
            return None
        flats = self._leader_flats(leader)
        metrics = {**record, "lsgd/leader": float(leader), "lsgd/leader_score": float(scores[leader])}
        if bool(torch.isnan(scores[self.global_rank])):
            self._reset_to(flats, "leader")
        elif self.global_rank == leader:
            metrics["lsgd/dist_to_leader"] = 0.0
        else:
            metrics["lsgd/dist_to_leader"] = self._pull_toward(self.layout.pack(), flats)
        self.round_history.append(metrics)
        return metrics

    def _groups_round(self, scores: Tensor) -> dict[str, float] | None:
        """Algorithm 1 with groups: the next local round (P·local_tau more steps of the job), global as well when
        the job's count is a multiple of P·tau (:meth:`~.lsgd_multi.LeaderGroups._multi_leader_round`)."""
        self.local_rounds_joined += 1
        global_due = self.local_rounds_joined * self.local_tau % self.tau == 0
        self.rounds_joined += int(global_due)
        record = {
            "lsgd/round": float(self.rounds_joined),
            "lsgd/local_round": float(self.local_rounds_joined),
            "lsgd/global": float(global_due),
            "lsgd/own_steps": float(self._steps),
        }
        when = f"{self.rounds_joined}" if global_due else f"after local round {self.local_rounds_joined}"
        metrics = self._multi_leader_round(scores, global_due, when)
        self.round_history.append({**record, **(metrics or {})})
        return None if metrics is None else {**record, **metrics}

    # ------------------------------------------------------------------------------------------------ both variants
    @override
    def _publish_initial(self, resumed_reference: list[Tensor] | None) -> None:
        if self.variant == "board":  # algorithm1: the weights travel by collectives, the board only counts steps
            self._publish_leader_copy(resumed_reference)

    @override
    def _uses_holder(self) -> bool:
        return self.variant == "board"  # algorithm1 moves weights by collectives

    @override
    def _communication_round(self) -> dict[str, float] | None:
        return self._global_round() if self.variant == "algorithm1" else self._board_round()

    def _pull_toward(self, own: list[Tensor], leader_copy: list[Tensor]) -> float:
        """x <- x - pull_strength (x - x_leader) (:func:`~..core.flat.pull_buckets`); returns ||x - x_l||."""
        return pull_buckets(self.layout.buckets, own, leader_copy, self.pull_strength)

    # ------------------------------------------------------------------------------------------------ the end
    @override
    def _settle_board(self) -> None:
        if self.variant == "board":
            self._final_election()

    @override
    def _reference_weights(self) -> list[Tensor]:
        if self.variant == "board":
            return self._leader_copy()
        with self._guard.bypass():  # called where every worker is present (evaluation, checkpoint, the end)
            if self.eval_on == "average":
                return self._average_weights()
            leader = elect_leader(self.collectives.all_gather(self.round_score().float().reshape(1)))
            if leader is None:
                rank_zero_warn("No worker has a finite training loss; rank 0 stands in as the leader.")
                leader = 0
            return self._leader_flats(leader)

    # ------------------------------------------------------------------------------------------------ checkpoints
    @override
    def _extra_state_dict(self) -> dict[str, Any]:
        # Saved after the rendezvous, when nothing moves: every shard holds the same record and round count.
        if self._board is None:
            return {}
        if self.variant == "algorithm1":
            return {"rounds_joined": self.rounds_joined, "local_rounds_joined": self.local_rounds_joined}
        return {"leader": self.read_leader()}

    @override
    def _load_extra_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds_joined = int(state.get("rounds_joined", 0))
        self.local_rounds_joined = int(state.get("local_rounds_joined", 0))
        self._restore_leader_record(state.get("leader"))

    @override
    def _on_fresh_start(self) -> None:
        self.rounds_joined, self.local_rounds_joined, self.round_history = 0, 0, []
