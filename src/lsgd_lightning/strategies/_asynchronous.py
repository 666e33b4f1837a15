"""The common part of the asynchronous strategies (asynchronous LSGD and EASGD, DOWNPOUR).

In the synchronous strategies a round is a collective: every worker waits for the slowest. Here a worker's round is
a transaction on shared state kept on the job's store (:class:`~._board.StoreBoard`): after every ``tau``-th of its
*own* optimizer steps a worker takes the board's lock, reads and/or writes the shared weights, releases it and goes
on. Nobody waits for anybody except for the lock, which is held for one transfer.

Where workers do meet (what keeps Lightning's contract, checkpoints and the end of training correct):

- Every rank still takes the same number of optimizer steps (Lightning's ``DistributedSampler`` gives every rank the
  same number of batches, checked when training starts), so every rank reaches the same points of the fit loop.
- Before any collective that Lightning or a callback runs through the strategy (``barrier``, ``broadcast``,
  ``reduce``, ``all_gather``: checkpointing, ``sync_dist`` logging, early stopping), before evaluation on the shared
  model and at the end of training, workers rendezvous on the store. A fast worker waits there for the slow ones for
  as long as they keep stepping (a collective would give up after the process group's timeout); it fails with the
  culprit's rank if one of them raised or stopped stepping for ``timeout``.
- Lightning (2.5+) also broadcasts rank 0's SIGTERM flag before *every* training step of a distributed run, which
  would put the workers in lockstep. For these strategies that per-step collective is replaced on the trainer's
  training loop by a flag on the store: a worker that received SIGTERM posts it, and every worker checks it before
  each step and stops with Lightning's ``SIGTERMException``, as it would have.
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

from collections.abc import Mapping
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from ._board import StoreBoard
from .periodic import PeriodicCommunicationStrategy


class AsynchronousStrategy(PeriodicCommunicationStrategy):
    """Base: rounds are transactions on a :class:`StoreBoard`; workers meet only where Lightning needs them to.

    Subclasses implement :meth:`_communication_round`, :meth:`_reference_weights` and :meth:`_publish_initial`.
    """

    asynchronous: ClassVar[bool] = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._board: StoreBoard | None = None
        self._board_active = False  # between setup of a fit and the end of training: rendezvous before collectives
        self._patched_loop: Any = None  # the training loop whose per-step SIGTERM broadcast is replaced

    @property
    def board(self) -> StoreBoard:
        if self._board is None:
            raise RuntimeError(f"{type(self).__name__}: the board exists only while fitting with several workers.")
        return self._board

    def _publish_initial(self, resumed_reference: list[Tensor] | None) -> None:
        """Rank 0, once per fit, before any round: put the shared state on the board (a fresh start has
        ``resumed_reference=None`` and every worker holds the same initial weights)."""
        raise NotImplementedError

    def _floating(self, flats: list[Tensor]) -> list[Tensor]:
        """The floating-point buckets of packed ``flats`` (what EASGD's center and DOWNPOUR's holder keep)."""
        return [flat for bucket, flat in zip(self.layout.buckets, flats) if bucket.floating]

    def _with_own_integers(self, floating: list[Tensor]) -> list[Tensor]:
        """A full packed layout: ``floating`` for the floating-point buckets, this rank's own integer buckets."""
        shared = iter(floating)
        return [next(shared) if bucket.floating else bucket.pack() for bucket in self.layout.buckets]

    # ------------------------------------------------------------------------------------------------ lifecycle
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING or self.world_size == 1:
            return
        assert self._failure_board is not None
        timeout_s = self._timeout.total_seconds() if self._timeout is not None else 1800.0
        self._board = StoreBoard(
            f"{self._failure_board.prefix}/async",
            self.global_rank,
            self.world_size,
            timeout_s,
            self.comm,
            self.root_device,
            failure_prefix=self._failure_board.prefix,
        )
        if self.is_global_zero:
            self._publish_initial(self._resumed_reference_flats())
        self.board.post_progress(self._steps)
        self._resumed_main_state_dict = None
        super().barrier("lsgd_lightning.async_board_ready")  # nobody reads the board before rank 0 has filled it
        self._board_active = True
        self._replace_sigterm_broadcast(trainer)

    def _replace_sigterm_broadcast(self, trainer: pl.Trainer) -> None:
        epoch_loop = trainer.fit_loop.epoch_loop
        if hasattr(epoch_loop, "_broadcast_sigterm_tensor"):  # Lightning's per-step collective (see module doc)
            epoch_loop._broadcast_sigterm_tensor = self._check_sigterm  # type: ignore[method-assign]
            self._patched_loop = epoch_loop

    def _check_sigterm(self) -> None:
        """Stop every worker, each before its next step, once any of them received SIGTERM (no collective)."""
        if not self._board_active:
            return
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and getattr(trainer, "received_sigterm", False):
            self.board.set_record("sigterm", str(self.global_rank))
        if self.board.has_record("sigterm"):
            raise SIGTERMException()

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

    def _comm_metrics(self) -> dict[str, float]:
        # The board's running number of the round's transaction: shows (and lets tests replay) the interleaving.
        return {**super()._comm_metrics(), "async/transaction": float(self.board.transaction)}

    def optimizer_step(self, *args: Any, **kwargs: Any) -> Any:
        output = super().optimizer_step(*args, **kwargs)
        if self._board_active:
            self.board.post_progress(self._steps)  # heartbeat: those waiting for this worker see it is alive
        return output

    def _swap_in_reference(self) -> None:
        if self._board_active and self.eval_on != "local":
            # Evaluate once everyone got here: the board is then still and every rank sees the same version.
            self.board.rendezvous("evaluation on the shared model")
        super()._swap_in_reference()

    def on_train_end(self) -> None:
        if not self._board_active:
            return super().on_train_end()
        self.board.rendezvous("the end of training")  # every worker has finished: the board no longer changes
        self._settle_board()
        super().on_train_end()  # final sync: read the shared model from the board
        super().barrier("lsgd_lightning.async_end")  # rank 0 serves the store: keep it until everyone has read
        self._board_active = False

    def _settle_board(self) -> None:
        """At the end of training, with every worker present: bring the board up to date (a collective)."""

    def on_exception(self, exception: BaseException) -> None:
        self._board_active = False
        super().on_exception(exception)

    def teardown(self) -> None:
        self._board_active = False
        if self._patched_loop is not None:  # back to Lightning's own method
            vars(self._patched_loop).pop("_broadcast_sigterm_tensor", None)
            self._patched_loop = None
        super().teardown()

    # ------------------------------------------------------------------------------------------------ collectives
    # Lightning and callbacks reach the other workers through these; a rendezvous first lets a fast worker wait
    # for a slow but live one without running into the collective's timeout.
    def _meet(self, what: str) -> None:
        if self._board_active:
            self.board.rendezvous(what)

    def barrier(self, name: str | None = None, *args: Any, **kwargs: Any) -> None:
        self._meet(f"barrier {name or ''}".strip())
        super().barrier(name, *args, **kwargs)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        self._meet("a broadcast")
        return super().broadcast(obj, src)

    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any = "mean") -> Any:
        if isinstance(tensor, Tensor):  # non-tensors are returned as they are, without a collective
            self._meet("a reduction (sync_dist logging?)")
        return super().reduce(tensor, group=group, reduce_op=reduce_op)

    def all_gather(self, tensor: Tensor, group: Any | None = None, sync_grads: bool = False) -> Tensor:
        self._meet("an all_gather")
        return super().all_gather(tensor, group=group, sync_grads=sync_grads)
