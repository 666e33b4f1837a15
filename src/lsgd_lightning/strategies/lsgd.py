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

How the leader's weights travel (``leader_broadcast``, single leader). ``"tree"`` (default) is
``torch.distributed.broadcast``: gloo's tree makes the leader send about log2(P) copies per round, which dominates on
slow links. ``"chain"`` passes them along the chain of ranks l, l+1, ..., l+P-1 (mod P) with point-to-point sends, in
``max(16, 2P)`` pieces per bucket so that the hops work as a pipeline: the leader's link carries exactly one copy,
every middle rank's link one copy in and one out, the last rank's one copy in; the round takes about
(1 + (P-2)/pieces) copy transfer times. Both deliver the same bytes, so the updates are identical bit for bit.
``comm/bytes`` counts the same for both, 4·d' + 4·P per round on every rank (d' = parameters and floating buffers,
integer buffers at their own size): the buffer each rank sends (the leader) or receives into (everyone else); a
middle rank's forwarding of the copy it received is not counted again.

Overlapping communication with computation (``overlap_steps`` = k >= 1, k < tau, single leader). At round step t the
scores are all-gathered and the leader l elected as above (P floats, blocking); the leader packs a snapshot
x_l(t) of its weights, and a background thread sends it (tree or chain) on a process group of its own while every
worker keeps training. After step t+k (its optimizer step) every non-leader applies the pull toward that snapshot::

    x_i <- x_i(t+k) - pull_strength * (x_i(t+k) - x_l(t))

so the weights pulled toward are k steps stale; integer buffers are copied from the snapshot, the leader does not
move, and a worker whose score was NaN at t is reset to x_l(t) at t+k. With k < tau at most one round is in flight.
The round's bytes and ``comm/rounds`` are counted at t; ``comm/seconds`` holds the election plus only the time the
training loop waits for the transfer (at t+k, normally zero when k steps outlast the transfer); ``lsgd/dist_to_leader``
(0 on the leader) and ``health/resets`` are logged at t+k. Anything that needs the round's traffic off the wire waits
for the transfer first, without applying the pull early: evaluation on the leader, checkpoints (the shard keeps the
received snapshot and its due step, so a resume applies the pull at t+k exactly as the uninterrupted run) and
teardown. When ``fit`` ends with a round in flight its pull is applied then (staleness below k), before the final
sync. On an exception the round is abandoned: the daemon thread ends when its sends finish or time out.

Why a thread on a separate process group: a chain must receive a piece before forwarding it, which async collectives
alone cannot express, and one thread issuing one round's operations on a group nothing else uses keeps the order of
operations identical on every rank (gloo pairs collectives by issue order, NCCL requires one order per
communicator), so the user's own collectives (``sync_dist`` logging, barriers) cannot interleave with the round's.
The c10d calls release the GIL. On CUDA the thread works on a side stream that first waits for the snapshot, and the
training stream waits for that side stream before the pull; the compute stream is never blocked in between.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from ._comm import payload_bytes
from ._flat import Bucket
from ._registration import log_rank_local, register_launcher_variants
from .periodic import PeriodicCommunicationStrategy, _check_int

LEADER_BROADCASTS = ("tree", "chain")


def elect_leader(scores: Tensor) -> int | None:
    """Index of the lowest finite score (ties: the lowest index), or ``None`` if no score is finite."""
    finite = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, math.inf))
    if not bool(torch.isfinite(finite).any()):
        return None
    return int(torch.argmin(finite))  # argmin returns the first minimal index


def send_along_chain(flats: list[Tensor], src: int, rank: int, world_size: int, group: Any = None) -> None:
    """Deliver ``src``'s ``flats`` to every rank along the chain src, src+1, ..., src+P-1 (mod P), in place.

    Each bucket is cut into ``max(16, 2P)`` pieces; a rank receives piece j from its predecessor and forwards it
    (without waiting for the send) before receiving piece j+1, so the hops overlap like a pipeline. Every link
    carries one copy. Ranks are global ranks; ``group`` must contain all of them.
    """
    position = (rank - src) % world_size
    previous = (rank - 1) % world_size if position > 0 else None
    following = (rank + 1) % world_size if position < world_size - 1 else None
    sends = []
    tag = 0
    for flat in flats:
        for piece in flat.tensor_split(min(flat.numel(), max(16, 2 * world_size))):
            # A tag per piece: each send is matched to its own receive, whatever the arrival order.
            if previous is not None:
                dist.recv(piece, src=previous, group=group, tag=tag)
            if following is not None:
                sends.append(dist.isend(piece, dst=following, group=group, tag=tag))
            tag += 1
    for work in sends:
        work.wait()


@dataclass
class _InFlightRound:
    """An overlapped round: the leader's snapshot travelling (``thread`` alive) or arrived, its pull due at ``due``."""

    flats: list[Tensor]  # the leader's packed weights at the round's step (received in place on the others)
    leader: int
    due: int  # the optimizer step after which the pull is applied
    reset: bool  # this rank's score was NaN at the round: it takes the snapshot instead of pulling toward it
    thread: threading.Thread | None = None
    error: BaseException | None = None


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
        overlap_steps: 0 (default) runs each round blocking; k in [1, tau) sends the leader's weights in the
            background and applies the pull toward them (then k steps old) k steps after the election. Single
            leader only.
        leader_broadcast: ``"tree"`` (default, ``torch.distributed.broadcast``) or ``"chain"`` (point-to-point
            along leader -> next rank -> ...; the leader's link carries one copy). Single leader only.
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
        overlap_steps: int = 0,
        leader_broadcast: str = "tree",
        **ddp_kwargs: Any,
    ) -> None:
        _check_fraction("pull_strength", pull_strength)
        _check_int("overlap_steps", overlap_steps, minimum=0)
        if leader_broadcast not in LEADER_BROADCASTS:
            raise ValueError(f"leader_broadcast must be 'tree' or 'chain', got {leader_broadcast!r}.")
        if group_size is not None and (overlap_steps > 0 or leader_broadcast != "tree"):
            raise ValueError(
                f"overlap_steps={overlap_steps} and leader_broadcast={leader_broadcast!r} need group_size=None: "
                "overlapped rounds and the chain broadcast are single-leader options (multi-leader rounds already "
                "keep most traffic inside the groups)."
            )
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
        if overlap_steps >= tau:
            raise ValueError(
                f"overlap_steps ({overlap_steps}) must be smaller than tau ({tau}): a round's pull must land before "
                "the next round starts, so that at most one round is in flight."
            )
        self.overlap_steps = overlap_steps
        self.leader_broadcast = leader_broadcast
        self._in_flight: _InFlightRound | None = None
        self._transfer_group: Any = None  # the overlapped rounds' own process group (all ranks)
        self._transfer_stream: Any = None  # CUDA only: the side stream the transfer thread works on
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
        if self.overlap_steps > 0 and self._transfer_group is None and self.world_size > 1:
            # Every rank sets up the same Trainer runs, so all of them create this group together.
            self._transfer_group = dist.new_group(timeout=self._timeout)
            if self.root_device.type == "cuda":
                self._transfer_stream = torch.cuda.Stream(self.root_device)

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
    def _round_step(self, step: int) -> bool:
        return step % (self.local_tau or self.tau) == 0

    def _round_due(self, step: int) -> bool:
        # Also the step at which an overlapped round's pull lands (`_communication_round` tells the two apart).
        return self._round_step(step) or (self._in_flight is not None and step >= self._in_flight.due)

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
        if self.leader_broadcast == "chain" and group is None:
            flats = self._snapshot(src)
            with self.comm.timed(self.root_device):
                send_along_chain(flats, src, self.global_rank, self.world_size)
            return flats
        collectives = self.collectives
        flats = []
        for bucket in self.layout.buckets:
            flat = bucket.pack() if self.global_rank == src else bucket.empty()
            flats.append(collectives.broadcast(flat, src=src, group=group, scope=scope))
        return flats

    def _snapshot(self, src: int) -> list[Tensor]:
        """``src``'s packed weights now (on ``src``) or buffers to receive them (elsewhere), counted in ``comm``."""
        flats = [bucket.pack() if self.global_rank == src else bucket.empty() for bucket in self.layout.buckets]
        for flat in flats:
            self.comm.count(payload_bytes(flat))
        return flats

    def _elect(self) -> tuple[Tensor, int | None]:
        scores = self._gather_scores()
        leader = elect_leader(scores)
        if leader is None:
            rank_zero_warn(f"LSGD round after step {self.steps} skipped: no worker has a finite training loss.")
        return scores, leader

    def _communication_round(self) -> dict[str, float] | None:
        in_flight = self._in_flight
        if in_flight is not None and (self._steps >= in_flight.due or self._round_step(self._steps)):
            self._complete_round(log=True)
        if not self._round_step(self._steps):
            return None  # only an overlapped round's pull was due
        if self.multi_leader:
            return self._multi_leader_round()
        if self.overlap_steps > 0:
            return self._start_round()
        scores, leader = self._elect()
        if leader is None:
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

    # ------------------------------------------------------------------------------------------------------------
    # Overlapped rounds
    # ------------------------------------------------------------------------------------------------------------
    def _start_round(self) -> dict[str, float] | None:
        """Elect (blocking), snapshot the leader's weights and send them in the background; the pull waits."""
        scores, leader = self._elect()
        if leader is None:
            return None
        round_ = _InFlightRound(
            flats=self._snapshot(leader),
            leader=leader,
            due=self._steps + self.overlap_steps,
            reset=bool(torch.isnan(scores[self.global_rank])),
        )
        ready = None
        if self._transfer_stream is not None:  # the side stream must not read the snapshot before it is packed
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.root_device))
        round_.thread = threading.Thread(
            target=self._transfer, args=(round_, ready), name=f"lsgd-round-{self._steps}", daemon=True
        )
        self._in_flight = round_
        round_.thread.start()
        return {"lsgd/leader": float(leader), "lsgd/leader_score": float(scores[leader])}

    def _transfer(self, round_: _InFlightRound, ready: Any) -> None:
        """The transfer thread: deliver the snapshot on the round's own process group; errors go to the round."""
        try:
            if ready is None:
                self._send(round_)
            else:
                with torch.cuda.device(self.root_device), torch.cuda.stream(self._transfer_stream):
                    self._transfer_stream.wait_event(ready)
                    self._send(round_)
        except BaseException as error:  # re-raised in the training thread by finish_transfer
            round_.error = error

    def _send(self, round_: _InFlightRound) -> None:
        if self.leader_broadcast == "chain":
            send_along_chain(round_.flats, round_.leader, self.global_rank, self.world_size, self._transfer_group)
            return
        for flat in round_.flats:
            dist.broadcast(flat, src=round_.leader, group=self._transfer_group)

    def finish_transfer(self) -> None:
        """Wait until the in-flight round's weights have arrived; its pull stays due at its step.

        A no-op without an overlapped round in flight. Raises the transfer's error, if it failed. The wait is
        bounded by the collective timeout and counted in ``comm/seconds``.
        """
        round_ = self._in_flight
        if round_ is None or round_.thread is None:
            return
        with self.comm.timed(self.root_device):
            round_.thread.join()
            if self._transfer_stream is not None:
                torch.cuda.current_stream(self.root_device).wait_stream(self._transfer_stream)
        round_.thread = None
        if round_.error is not None:
            self._in_flight = None
            raise round_.error

    def _complete_round(self, log: bool) -> None:
        """Apply the in-flight round's pull now: x <- x - pull_strength (x - x_leader(t)) on every non-leader."""
        self.finish_transfer()
        round_, self._in_flight = self._in_flight, None
        assert round_ is not None
        metrics: dict[str, float] = {}
        if round_.reset:
            self._reset_to(round_.flats, "leader")
        elif self.global_rank == round_.leader:
            metrics["lsgd/dist_to_leader"] = 0.0  # the leader does not move
        else:
            metrics["lsgd/dist_to_leader"] = self._pull([(round_.flats, self.pull_strength)], copy_from=0)[0]
        metrics["health/resets"] = float(self.resets)
        self.round_metrics.update(metrics)
        if log:
            log_rank_local(self.lightning_module, metrics)

    def _abandon_round(self) -> None:
        # Joining could wait for peers that are gone; the daemon thread ends when its sends finish or time out.
        self._in_flight = None

    def _on_fresh_start(self) -> None:
        self._in_flight = None

    def _extra_state_dict(self) -> dict[str, Any]:
        """A round in flight: its snapshot (arrived: the transfer is waited for) and when its pull is due."""
        if self._in_flight is None:
            return {}
        self.finish_transfer()
        round_ = self._in_flight
        return {
            "in_flight": {
                "flats": [flat.detach().cpu() for flat in round_.flats],
                "leader": round_.leader,
                "due": round_.due,
                "reset": round_.reset,
            }
        }

    def _load_extra_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state.get("in_flight")
        self._in_flight = None
        if saved is not None:
            flats = [flat.to(bucket.device) for flat, bucket in zip(saved["flats"], self.layout.buckets)]
            self._in_flight = _InFlightRound(flats, int(saved["leader"]), int(saved["due"]), bool(saved["reset"]))

    def on_train_end(self) -> None:
        if self._in_flight is not None:  # fit ended inside an overlapped round: land its pull before the final sync
            self._complete_round(log=False)  # Lightning allows no self.log in on_train_end
        super().on_train_end()

    def on_exception(self, exception: BaseException) -> None:
        self._abandon_round()
        super().on_exception(exception)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        self.finish_transfer()  # before the checkpoint's own collectives; the shard keeps the pending pull
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def teardown(self) -> None:
        try:
            self.finish_transfer()  # nothing is in flight after fit or an exception; this only guards other paths
        finally:
            super().teardown()

    @property
    def round_in_flight(self) -> bool:
        """Whether an overlapped round has started and its pull has not been applied yet."""
        return self._in_flight is not None

    def _reference_weights(self) -> list[Tensor]:
        self.finish_transfer()  # evaluation, final sync and checkpoints see the round's traffic off the wire
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
