"""Meeting points of the strategies whose workers run at different steps (the asynchronous strategies, AD-PSGD).

Between meeting points such workers communicate only through the job's store (a
:class:`~lsgd_lightning.core.board.StoreBoard`) and point to point, so a worker may be several steps ahead of another.
Lightning and user code still expect collectives over every worker in places; :class:`MeetingPoints` gives a strategy
the meeting points that make those correct, for one ``fit`` with several workers:

- every collective on ``torch.distributed`` during the fit first meets the others
  (:class:`~lsgd_lightning.core.guard.CollectiveGuard` calls :meth:`MeetingPoints._meet`);
- evaluation on the reference model starts with a meeting, so that every rank evaluates the same, still weights;
- at the end of training every worker meets the others, the strategy settles (:meth:`MeetingPoints._settle_board`),
  takes the reference model (``final_sync``) and waits in a last barrier, which keeps the rank-0 process, which serves
  the store, alive until everyone has read it.

A subclass (listed before its :class:`~.base.ReplicaStrategy` base) calls :meth:`MeetingPoints._open_board` in its
``setup``, installs :attr:`MeetingPoints._guard` once the board is ready, and implements :meth:`MeetingPoints._meet`.
"""

from __future__ import annotations

from typing import Any

from typing_extensions import override

from ..core.board import StoreBoard
from ..core.guard import CollectiveGuard
from .base import ReplicaStrategy


class MeetingPoints(ReplicaStrategy):
    """Mixin: the board of one fit, the collective guard, and the meetings at evaluation and at the end of training.

    Subclasses implement :meth:`_meet` (every worker at one point; ``what`` names it in error messages).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._board: StoreBoard | None = None
        self._guard = CollectiveGuard(self._meet)  # installed between the board's setup and the end of training

    def _meet(self, what: str) -> None:
        """Every worker at one point (a rendezvous on the board, after whatever the algorithm must settle first)."""
        raise NotImplementedError

    def _open_board(self, name: str) -> StoreBoard:
        """This fit's board under ``name`` (call in ``setup`` while fitting with several workers)."""
        assert self._health is not None
        self._board = StoreBoard(
            f"{self._health.prefix}/{name}",
            self.global_rank,
            self.world_size,
            self._timeout_s(),
            self.comm,
            self.root_device,
            health=self._health,
        )
        return self._board

    def _settle_board(self) -> None:
        """At the end of training, with every worker present: bring the shared state up to date (a collective)."""

    @override
    def _swap_in_reference(self) -> None:
        if self._guard.installed and self.eval_on != "local" and not self._evaluating_checkpoint:
            # Evaluate once everyone got here: every rank then sees the same, still weights.
            self._meet(f"evaluation on the {self.reference_name}")
        with self._guard.bypass():
            super()._swap_in_reference()

    @override
    def on_train_end(self) -> None:
        if not self._guard.installed:
            return super().on_train_end()
        self._meet("the end of training")  # every worker has finished: nothing changes any more
        with self._guard.bypass():
            self._settle_board()
            super().on_train_end()  # final sync: the reference model
            super().barrier("lsgd_lightning.meetings_end")  # rank 0 serves the store: keep it until everyone has read
        self._guard.uninstall()

    @override
    def on_exception(self, exception: BaseException) -> None:
        self._guard.uninstall()
        super().on_exception(exception)

    @override
    def teardown(self) -> None:
        self._guard.uninstall()
        super().teardown()
