"""Leader SGD (Teng et al., NeurIPS 2019, arXiv:1905.10395) as a Lightning strategy, with one leader.

Each worker i trains its own replica x_i with its own optimizer on its own data shard. Its *score* is the mean of
its last ``leader_window`` training losses (+inf if non-finite). After every ``tau``-th optimizer step:

1. all workers all-gather their scores (P floats) and elect the leader l = argmin score (ties: lowest rank);
2. the leader broadcasts its parameters and floating-point buffers as flat buffers (d values);
3. every other worker pulls toward it, outside the optimizer (momentum never sees the pull)::

       x_i <- x_i - pull_strength * (x_i - x_l)          (core.rules.leader_pull)

   integer buffers are copied from the leader, and the leader itself does not move.

Communicated per round and worker: 4·P bytes of scores plus the model (4·d bytes for float32), so (4·d + 4·P) / tau
bytes per optimizer step, against 4·d per step for data-parallel SGD. If every score is non-finite the round is
skipped with a warning; a worker whose score is NaN (diverged) takes the leader's weights with fresh optimizer state.

``leader_broadcast="chain"`` (gloo, CPU) passes the leader's weights along ranks l, l+1, ... (mod P) in a pipeline
of pieces (:func:`~lsgd_lightning.core.collectives.send_along_chain`), so every link carries one copy where gloo's
tree makes the leader send about log2 P; the updates are bit for bit the tree's. ``overlap_steps=k`` elects at
step t (blocking, P floats), sends x_l(t) as asynchronous collectives on a process group of its own while training
goes on (:class:`~lsgd_lightning.core.transfer.InFlightRound`), and after step t+k applies
``x_i <- x_i - pull_strength (x_i - x_l(t))`` toward the k-step-old weights. Evaluation, checkpoints (the shard keeps
the received weights and the due step: a resume is exact) and teardown wait for the transfer first; a round in
flight when ``fit`` ends is applied then, before the final sync. The chain cannot run in the background (gloo's
point-to-point operations report no completion before they are waited for), so overlapped rounds use the tree.

``eval_on="average"`` evaluates, checkpoints (main file) and final-syncs the workers' average, what every LSGD figure
of the paper reports: parameters and floating-point buffers all-reduced (4·d bytes per worker per evaluation,
checkpoint and final sync; the rounds are unchanged), optionally with BatchNorm statistics re-estimated on
``bn_recalibration_batches`` training batches of every worker (:mod:`.recalibration`). The authors' code evaluates
each group's average when workers form groups; the multi-leader strategy evaluates the mean of all P workers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from ..core.collectives import payload_bytes
from ..core.flat import pull_buckets
from ..core.rules import elect_leader
from ..core.transfer import InFlightRound
from .checks import check_chain_devices, check_leader_options
from .election import LeaderElection
from .metrics import log_rank_local
from .periodic import PeriodicStrategy


class LSGDStrategy(LeaderElection, PeriodicStrategy):
    """Leader SGD: every ``tau`` steps, pull all workers toward the worker with the lowest recent training loss.

    Args:
        tau: optimizer steps between rounds (>= 1).
        pull_strength: how far each worker moves toward the leader per round, in [0, 1] (λ in the paper; 0 is
            independent local SGD, 1 copies the leader).
        leader_window: number of recent training losses averaged into a worker's score (>= 1).
        overlap_steps: 0 (default) runs each round blocking; k in [1, tau) sends the leader's weights in the
            background and applies the pull toward them (then k steps old) k steps after the election.
        leader_broadcast: ``"tree"`` (default, ``torch.distributed.broadcast``) or ``"chain"`` (point-to-point
            along leader -> next rank -> ...; the leader's link carries one copy; CPU/gloo, blocking rounds only).
        bn_recalibration_batches: with ``eval_on="average"``, re-estimate the average's BatchNorm statistics on
            this many of each rank's training batches before it is evaluated, saved or final-synced (0: off).
        **kwargs: :class:`~.base.ReplicaStrategy`'s ``eval_on`` (``"leader"``, ``"average"``: all workers' mean
            weights, or ``"local"``), ``final_sync``, ``bucket_cap_mb``, ``timeout``, ``start_method`` and
            Lightning's process arguments.

    ``LSGDStrategy(group_size=...)`` builds a :class:`~.lsgd_multi.MultiLeaderLSGDStrategy` (one leader per group).
    Registered as ``"lsgd"`` (subprocess launcher) and ``"lsgd_spawn"`` (spawn launcher).
    """

    strategy_name: ClassVar[str] = "lsgd"

    def __new__(cls, *args: Any, group_size: int | str | None = None, **kwargs: Any) -> LSGDStrategy:
        if cls is LSGDStrategy and group_size is not None:
            from .lsgd_multi import MultiLeaderLSGDStrategy

            return super().__new__(MultiLeaderLSGDStrategy)
        return super().__new__(cls)

    def __init__(
        self,
        tau: int = 16,
        pull_strength: float = 0.1,
        leader_window: int = 10,
        overlap_steps: int = 0,
        leader_broadcast: str = "tree",
        bn_recalibration_batches: int = 0,
        **kwargs: Any,
    ) -> None:
        check_leader_options(tau, pull_strength, overlap_steps, leader_broadcast, kwargs)
        super().__init__(tau=tau, loss_window=leader_window, **kwargs)
        self._accept_bn_recalibration(bn_recalibration_batches)
        self.pull_strength = float(pull_strength)
        self.overlap_steps = overlap_steps
        self.leader_broadcast = leader_broadcast
        self._in_flight: InFlightRound | None = None
        self._transfer_group: Any = None  # the overlapped rounds' own process group (all ranks)

    @property
    def leader_window(self) -> int:
        return self.loss_window

    @property
    def round_in_flight(self) -> bool:
        """Whether an overlapped round has started and its pull has not been applied yet."""
        return self._in_flight is not None

    @override
    def _configure_launcher(self) -> None:
        check_chain_devices(self.leader_broadcast, self.parallel_devices or [])
        super()._configure_launcher()

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if self.overlap_steps > 0 and self._transfer_group is None and self.world_size > 1:
            # Every rank sets up the same Trainer runs, so all of them create this group together.
            self._transfer_group = dist.new_group(timeout=self._timeout)

    @override
    def _release_process_groups(self) -> bool:
        if self.round_in_flight:
            return False  # destroying the group would wait for the transfer (up to the timeout after a failure)
        self._transfer_group = None
        return super()._release_process_groups()

    # ------------------------------------------------------------------------------------------------ rounds
    def _round_step(self, step: int) -> bool:
        return step % self.tau == 0

    @override
    def _round_due(self, step: int) -> bool:
        # Also the step at which an overlapped round's pull lands (`_communication_round` tells the two apart).
        return self._round_step(step) or (self._in_flight is not None and step >= self._in_flight.due)

    def _gather_scores(self, scope: str | None = None) -> Tensor:
        """Every worker's round score (NaN: diverged); raises on every rank alike if all workers diverged."""
        scores = self.collectives.all_gather(self.round_score().float().reshape(1), scope=scope)
        if bool(torch.isnan(scores).all()):
            self._raise_all_diverged()
        return scores

    def _elect(self) -> tuple[Tensor, int | None]:
        scores = self._gather_scores()
        leader = elect_leader(scores)
        if leader is None:
            rank_zero_warn(f"LSGD round after step {self.steps} skipped: no worker has a finite training loss.")
        return scores, leader

    def _broadcast_flats(self, src: int) -> list[Tensor]:
        """``src``'s packed weights on every rank, by ``leader_broadcast``: a tree or a chain."""
        if self.leader_broadcast != "chain":
            return self._leader_flats(src)
        flats = self._leader_weights(src)
        self.collectives.chain_broadcast(flats, src, self.global_rank, self.world_size)
        return flats

    def _pull_toward(self, leader_flats: list[Tensor]) -> float:
        """x <- x - pull_strength (x - x_leader) (:func:`~..core.flat.pull_buckets`); returns ||x - x_l||."""
        return pull_buckets(self.layout.buckets, self.layout.pack(), leader_flats, self.pull_strength)

    @override
    def _communication_round(self) -> dict[str, float] | None:
        in_flight = self._in_flight
        if in_flight is not None and (self._steps >= in_flight.due or self._round_step(self._steps)):
            self._complete_round(log=True)
        if not self._round_step(self._steps):
            return None  # only an overlapped round's pull was due
        if self.overlap_steps > 0:
            return self._start_round()
        scores, leader = self._elect()
        if leader is None:
            return None
        leader_flats = self._broadcast_flats(leader)
        metrics = {"lsgd/leader": float(leader), "lsgd/leader_score": float(scores[leader])}
        if bool(torch.isnan(scores[self.global_rank])):
            self._reset_to(leader_flats, "leader")
        elif self.global_rank == leader:
            metrics["lsgd/dist_to_leader"] = 0.0  # the leader does not move
        else:
            metrics["lsgd/dist_to_leader"] = self._pull_toward(leader_flats)
        return metrics

    @override
    def _reference_weights(self) -> list[Tensor]:
        self.finish_transfer()  # evaluation, final sync and checkpoints see the round's traffic off the wire
        if self.eval_on == "average":
            return self._average_weights()
        leader = elect_leader(self._gather_scores())
        if leader is None:
            rank_zero_warn("No worker has a finite training loss; rank 0 stands in as the leader.")
            leader = 0
        return self._broadcast_flats(leader)

    # ------------------------------------------------------------------------------------------------ overlap
    def _start_round(self) -> dict[str, float] | None:
        """Elect (blocking), then post the broadcasts of the leader's weights; the pull waits ``overlap_steps``."""
        scores, leader = self._elect()
        if leader is None:
            return None
        flats = self._leader_weights(leader)
        for flat in flats:
            self.comm.count(payload_bytes(flat))
        reset = bool(torch.isnan(scores[self.global_rank]))
        due = self._steps + self.overlap_steps
        self._in_flight = InFlightRound.start(flats, leader, due, reset, self._transfer_group)
        return {"lsgd/leader": float(leader), "lsgd/leader_score": float(scores[leader])}

    def finish_transfer(self) -> None:
        """Wait until the in-flight round's weights have arrived; its pull stays due at its step.

        A no-op without an overlapped round in flight. Raises the transfer's error, if it failed. The wait is
        bounded by the collective timeout and counted in ``comm/seconds``.
        """
        round_ = self._in_flight
        if round_ is None or round_.arrived:
            return
        try:
            with self.comm.timed(self.root_device):
                round_.wait()
        except BaseException:
            self._in_flight = None
            raise

    def _complete_round(self, log: bool) -> None:
        """Apply the in-flight round's pull now: x <- x - pull_strength (x - x_leader(t)) on every non-leader."""
        self.finish_transfer()
        round_, self._in_flight = self._in_flight, None
        assert round_ is not None
        metrics: dict[str, float] = {}
        if round_.reset:
            self._reset_to(round_.flats, "leader")
        elif self.global_rank == round_.leader:
            metrics["lsgd/dist_to_leader"] = 0.0
        else:
            metrics["lsgd/dist_to_leader"] = self._pull_toward(round_.flats)
        metrics["health/resets"] = float(self.resets)
        self.round_metrics.update(metrics)
        if log:
            log_rank_local(self.lightning_module, metrics)

    @override
    def _on_fresh_start(self) -> None:
        self._in_flight = None

    @override
    def _extra_state_dict(self) -> dict[str, Any]:
        """A round in flight: its weights (arrived: the transfer is waited for) and when its pull is due."""
        if self._in_flight is None:
            return {}
        self.finish_transfer()
        assert self._in_flight is not None
        return {"in_flight": self._in_flight.state_dict()}

    @override
    def _load_extra_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state.get("in_flight")
        devices = [bucket.device for bucket in self.layout.buckets]
        self._in_flight = None if saved is None else InFlightRound.from_state_dict(saved, devices)

    @override
    def on_train_end(self) -> None:
        if self._in_flight is not None:  # fit ended inside an overlapped round: land its pull before the final sync
            self._complete_round(log=False)  # Lightning allows no self.log in on_train_end
        super().on_train_end()

    @override
    def on_exception(self, exception: BaseException) -> None:
        self._in_flight = None  # abandoned: the backend finishes or times out the posted operations on its own
        super().on_exception(exception)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        self.finish_transfer()  # before the checkpoint's own collectives; the shard keeps the pending pull
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @override
    def teardown(self) -> None:
        try:
            self.finish_transfer()  # nothing is in flight after fit or an exception; this only guards other paths
        finally:
            super().teardown()
