"""What every strategy of the package adds to Lightning's ``DDPStrategy``, whether or not it wraps the model in DDP.

- its names in Lightning's registry (``name`` and ``name_spawn``) and a ``repr`` that says which Trainer namespace it
  is for (Lightning's error for a strategy of the other namespace shows only the ``repr``);
- the job's health board (who failed, heartbeats) and, while fitting with several workers, the job control of
  :mod:`.job_control`: Lightning's per-step SIGTERM broadcast replaced by the store, a SIGTERM on one rank stopping
  every rank at a common batch, and a failing rank's error reaching the others;
- no collective from a worker that handles an exception alone (``Trainer.save_checkpoint`` ends with a barrier that
  the other workers would never join).
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.fabric.strategies import _StrategyRegistry
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from .._twins import describe
from ..core.health import HealthBoard, new_board
from .job_control import JobControl, report_exception
from .registration import register_launcher_variants
from .shutdown import release_process_groups_at_exit


class SupervisedStrategy(DDPStrategy):
    """``DDPStrategy`` with the package's registration, job health and job control (see the module docstring).

    Subclasses call :meth:`_supervise` in ``setup`` once the process group exists.
    """

    strategy_name: ClassVar[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._health: HealthBoard | None = None
        self._job: JobControl | None = None  # heartbeats and stop requests while fitting with several workers

    @override
    def __repr__(self) -> str:
        return describe(self)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        register_launcher_variants(strategy_registry, cls, cls.strategy_name)

    def _supervise(self, trainer: pl.Trainer) -> None:
        """A health board for this run; when fitting with several workers, the job control on ``trainer``."""
        release_process_groups_at_exit(self)  # a worker that trained must exit 0: see shutdown.py
        self._health = new_board(self.global_rank, self.world_size, self._timeout)
        if trainer.state.fn == TrainerFn.FITTING and self.world_size > 1:
            self._job = JobControl.start(trainer, self._health, self._timeout)

    def _release_process_groups(self) -> bool:
        """At interpreter exit (:mod:`.shutdown`): drop the process groups this strategy created; ``False`` while
        one of them still has a collective in flight."""
        return True

    def _handling_failure(self) -> bool:
        return self._job is not None and self._job.handling_failure()

    @override
    def on_train_start(self) -> None:
        if self._job is not None:
            self._job.take_over_sigterm()  # Lightning registers its signal handlers after the strategy's setup
        super().on_train_start()

    @override
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        report_exception(self._job, self._health, exception)

    @override
    def barrier(self, name: str | None = None, *args: Any, **kwargs: Any) -> None:
        if self._handling_failure():
            return  # the other workers will never join
        super().barrier(name, *args, **kwargs)

    @override
    def teardown(self) -> None:
        if self._job is not None:
            self._job.uninstall()
            self._job = None
        super().teardown()
