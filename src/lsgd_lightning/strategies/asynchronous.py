"""The common part of the asynchronous strategies (asynchronous LSGD and EASGD, DOWNPOUR).

In the synchronous strategies a round is a collective: every worker waits for the slowest. Here a worker's round is
a transaction on shared state kept on the job's store (:class:`~lsgd_lightning.core.board.StoreBoard`): after every
``tau``-th of its *own* optimizer steps a worker takes the board's lock, reads and/or writes the shared weights,
releases it and goes on. Nobody waits for anybody except for the lock, which is held for one transfer.

Where workers do meet (what keeps Lightning's contract, checkpoints and the end of training correct):

- Every rank still takes the same number of optimizer steps (Lightning's ``DistributedSampler`` gives every rank the
  same number of batches, checked when training starts), so every rank reaches the same points of the fit loop.
- Before every collective on ``torch.distributed`` that anyone runs during the fit (Lightning's checkpointing and
  ``sync_dist`` logging, torchmetrics' syncs, early stopping, a callback's own collectives), before evaluation on the
  shared model and at the end of training, workers rendezvous on the store
  (:class:`~lsgd_lightning.core.guard.CollectiveGuard`, through :class:`~.meetings.MeetingPoints`). A fast worker
  waits there for the slow ones for as long as they keep training (a collective would give up after the process
  group's timeout); it fails with the culprit's rank if one of them raised or started no batch for ``timeout``.
- Lightning's per-step SIGTERM broadcast is replaced by a flag on the store (:mod:`.job_control`), as for every
  strategy of the package; a SIGTERM stops every worker at a common batch (the fast ones wait there for the slow
  ones to catch up, so that a checkpoint written on the way out holds every worker at the same step).
- So stragglers do not slow the others *within* an epoch (or between validation runs and checkpoints); at those
  points, and at the end, the job still waits for the slowest worker. Log training metrics rank-locally
  (``sync_dist=False``, the default): a synced log in ``training_step`` turns every step into a rendezvous.
- Checkpoints are consistent: they are written after the rendezvous, when every worker has taken the same number of
  steps and nobody changes the board; each shard holds its worker, the main file the board's shared model.
- At the end every worker waits until all have finished, then (``final_sync``) takes the shared model, and a last
  barrier keeps the rank-0 process, which serves the store, alive until everyone has read it.

A subclass implements :meth:`_communication_round` (one transaction on ``self.board``), :meth:`_reference_weights`
(read the shared model from the board) and :meth:`_publish_initial` (what rank 0 puts on the board at the start).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from typing_extensions import override

from ..core.board import StoreBoard
from ..core.flat import to_master
from ..core.holder import WEIGHT_TRANSPORTS, RpcHolder, check_no_foreign_agent, check_rpc_options, require_rpc
from .checks import check_choice
from .meetings import MeetingPoints
from .periodic import PeriodicStrategy


class AsynchronousStrategy(MeetingPoints, PeriodicStrategy):
    """Base: rounds are transactions on a :class:`StoreBoard`; workers meet only where Lightning needs them to.

    Subclasses implement :meth:`_communication_round`, :meth:`_reference_weights` and :meth:`_publish_initial`.

    Args:
        weight_transport: how the shared weights travel to and from the rank-0 process that holds them:
            ``"rpc"`` (default: ``torch.distributed.rpc``/TensorPipe, :class:`~..core.holder.RpcHolder`) or
            ``"store"`` (as values on the job's c10d store, through its one server thread; for torch builds
            without RPC). The lock, the records and the rendezvous stay on the store either way.
        rpc_options: further ``torch.distributed.rpc.TensorPipeRpcBackendOptions`` arguments for ``"rpc"`` (e.g.
            ``num_worker_threads``, default 4; ``_transports=["uv"]`` to force TCP between processes of one machine).
        **kwargs: passed on to the algorithm's base.

    Raises:
        ValueError: an unknown ``weight_transport``; ``rpc_options`` setting ``init_method``/``rpc_timeout``, not
            accepted by ``TensorPipeRpcBackendOptions``, or given with ``weight_transport="store"``.
        RuntimeError: ``"rpc"`` where this torch build has no ``torch.distributed.rpc``.
    """

    def __init__(
        self, *args: Any, weight_transport: str = "rpc", rpc_options: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        check_choice("weight_transport", weight_transport, WEIGHT_TRANSPORTS)
        if weight_transport == "rpc":
            require_rpc()
        elif rpc_options:
            raise ValueError(
                "rpc_options apply to weight_transport='rpc' only; drop them, or use weight_transport='rpc'."
            )
        self.rpc_options = check_rpc_options(rpc_options)
        self.weight_transport = weight_transport
        super().__init__(*args, **kwargs)

    @property
    def board(self) -> StoreBoard:
        if self._board is None:
            raise RuntimeError(f"{type(self).__name__}: the board exists only while fitting with several workers.")
        return self._board

    shared_name: ClassVar[str] = "shared"  # the board entry of the shared floating-point model (center, parameters)

    def _publish_initial(self, resumed_reference: list[Tensor] | None) -> None:
        """Rank 0, once per fit, before any round: put the shared state on the board (a fresh start has
        ``resumed_reference=None`` and every worker holds the same initial weights). Default: the floating-point
        buckets as the shared model."""
        shared = self._floating(resumed_reference or self.layout.pack())
        self.board.put(self.shared_name, [to_master(flat) for flat in shared])  # float32 for a half model

    def _transact(self, update: Callable[[list[Tensor], list[Tensor]], list[Tensor]]) -> tuple[bool, list[Tensor]]:
        """One round on the shared model: under the lock, read it and (unless this worker diverged) write back
        ``update(own, shared)``. Returns (diverged, the shared model as written, or as read if diverged)."""
        diverged = self.is_diverged()
        own = self.layout.masters()
        with self.board.locked():
            shared = self.board.get(self.shared_name, like=own)
            if not diverged:
                shared = update(own, shared)
                self.board.put(self.shared_name, shared)
        if diverged:
            self._reset_to(self._with_own_integers(shared), self.reference_name)
        return diverged, shared

    @override
    def _reference_weights(self) -> list[Tensor]:
        like = self.layout.masters()
        with self.board.locked():
            shared = self.board.get(self.shared_name, like=like)
        return self._with_own_integers([s.to(b.dtype) for s, b in zip(shared, self.layout.floating_buckets)])

    def _floating(self, flats: list[Tensor]) -> list[Tensor]:
        """The floating-point buckets of packed ``flats`` (what EASGD's center and DOWNPOUR's holder keep)."""
        return [flat for bucket, flat in zip(self.layout.buckets, flats) if bucket.floating]

    def _with_own_integers(self, floating: list[Tensor]) -> list[Tensor]:
        """A full packed layout: ``floating`` for the floating-point buckets, this rank's own integer buckets."""
        shared = iter(floating)
        return [next(shared) if bucket.floating else bucket.pack() for bucket in self.layout.buckets]

    # ------------------------------------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING or self.world_size == 1:
            return
        board = self._open_board("async")
        if self.weight_transport == "rpc" and self._uses_holder():
            # A rendezvous of every worker; weights then go to and from rank 0 by RPC, the rest stays on the store.
            assert self._health is not None
            check_no_foreign_agent()
            # init_rpc waits for every worker without a timeout: meet first, where a worker that failed is named.
            board.rendezvous("the start of the parameter holder's RPC agent")
            key = f"{self._health.prefix}/holder"  # unique to this fit
            board.holder = RpcHolder(
                key, self.global_rank, self.world_size, board.store, self._timeout_s(), self.rpc_options
            )
        if self.is_global_zero:
            self._publish_initial(self._resumed_reference_flats())
        self._prepare_board()
        self._resumed_main_state_dict = None
        super().barrier("lsgd_lightning.async_board_ready")  # nobody reads the board before rank 0 has filled it
        board.while_waiting = self._waiting
        if self._job is not None:
            self._job.while_waiting = self._waiting
        self._guard.install()

    def _uses_holder(self) -> bool:
        """Whether this fit keeps weights on the board (not so in asynchronous LSGD's Algorithm 1)."""
        return True

    def _close_holder(self, graceful: bool) -> None:
        if self._board is not None:
            self._board.holder.close(graceful)

    @override
    def on_train_end(self) -> None:
        super().on_train_end()  # every worker present: the final sync, then a barrier
        self._close_holder(graceful=True)

    @override
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)  # posts the failure first: a peer whose transfer breaks then finds it
        self._close_holder(graceful=False)  # another worker may be gone: do not wait for it

    @override
    def teardown(self) -> None:
        self._close_holder(graceful=False)  # no-op after a normal end (closed in on_train_end)
        super().teardown()

    def _prepare_board(self) -> None:
        """Every rank, before the board is used: add what this rank contributes to the shared state."""

    def _while_waiting(self) -> None:
        """Work the other workers may need from this one while it waits at a meeting point (default: none)."""

    def _waiting(self) -> None:
        with self._guard.bypass():  # the strategy's own collectives, at a point where every worker takes part
            self._while_waiting()

    def _resumed_reference_flats(self) -> list[Tensor] | None:
        """The shared model saved in the checkpoint's main file, packed like the layout (None on a fresh start)."""
        if self._resumed_state is None or self._resumed_main_state_dict is None:
            return None
        saved: Mapping[str, Tensor] = self._resumed_main_state_dict
        own = self.layout.pack()
        flats = []
        for bucket, flat in zip(self.layout.buckets, own):
            parts = [
                saved[name].reshape(-1).to(flat) if name in saved else part.reshape(-1)
                for name, part in zip(bucket.names, bucket.split(flat))
            ]
            flats.append(torch.cat(parts) if parts else flat)
        return flats

    @override
    def _comm_metrics(self) -> dict[str, float]:
        # The board's running number of the round's transaction: shows (and lets tests replay) the interleaving.
        return {**super()._comm_metrics(), "async/transaction": float(self.board.transaction)}

    @override
    def _meet(self, what: str) -> None:
        self.board.rendezvous(what)
