"""The shared base of every strategy whose workers keep their own replicas (all but data-parallel SGD).

On top of Lightning's ``DDPStrategy`` (process groups, launchers, cluster environments, ``DistributedSampler``),
without the DDP wrapper: the identical start, counting real optimizer steps, each rank's recent losses, evaluation
on the *reference model* (leader, center, average, ...) swapped into every rank, the final sync, sharded checkpoints
(:mod:`.checkpoints`), the ``comm/*`` accounting and the job's health (:mod:`.job_control`). A subclass implements
:meth:`ReplicaStrategy._after_local_step` (its schedule) and :meth:`ReplicaStrategy._reference_weights`.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from ..core.collectives import Collectives, CommMeter
from ..core.flat import FlatLayout
from ..core.scores import ScoreWindow, all_diverged_error
from . import checkpoints as ckpt
from .checks import (
    check_bool,
    check_choice,
    check_equal_epoch_lengths,
    check_int,
    check_positive,
    check_process_kwargs,
    refuse_sync_batchnorm,
)
from .job_control import limit_cpu_threads
from .metrics import log_rank_local
from .supervised import SupervisedStrategy

START_METHODS = ("popen", "spawn", "fork", "forkserver")


class ReplicaStrategy(SupervisedStrategy, ABC):
    """Base class: every worker trains its own replica; the subclass says what happens after each local step.

    Args:
        eval_on: which weights validation/test/predict see: the algorithm's reference model
            (``reference_name``, e.g. ``"leader"``) swapped into every rank, or ``"local"`` (each rank its own).
        final_sync: when ``fit`` ends, every worker takes the reference model's weights.
        loss_window: how many recent training losses make a worker's score.
        bucket_cap_mb: largest flat buffer sent in one collective (MiB).
        timeout: the collectives' timeout (a ``timedelta``); also how long a worker waits for a silent peer.
        start_method: Lightning's launcher, ``"popen"`` (scripts, torchrun, SLURM) or ``"spawn"`` (notebooks).
        ddp_kwargs: the other ``DDPStrategy`` arguments that concern processes, not the DDP wrapper:
            ``accelerator``, ``parallel_devices``, ``cluster_environment``, ``checkpoint_io``,
            ``precision_plugin``, ``process_group_backend``; anything else is refused with a ``TypeError``.
    """

    strategy_name: ClassVar[str]
    reference_name: ClassVar[str]
    _loss_window_arg: ClassVar[str] = "loss_window"  # the constructor's name for it, used in error messages
    # What a worker without recorded losses misses (said in the warning): only the divergence test, by default.
    _without_loss: ClassVar[str] = "a non-finite loss cannot be noticed (only non-finite weights are)"

    def __init__(
        self,
        eval_on: str | None = None,
        final_sync: bool = True,
        loss_window: int = 10,
        bucket_cap_mb: float = 25.0,
        *,
        timeout: timedelta | None = default_pg_timeout,
        start_method: str = "popen",
        **ddp_kwargs: Any,
    ) -> None:
        check_process_kwargs(type(self).__name__, ddp_kwargs)
        eval_on = self.reference_name if eval_on is None else eval_on
        check_int(self._loss_window_arg, loss_window, minimum=1)
        check_choice("eval_on", eval_on, self.evaluated_models())
        check_bool("final_sync", final_sync)
        check_positive("bucket_cap_mb", bucket_cap_mb, " of MiB")
        check_choice("start_method", start_method, START_METHODS)
        super().__init__(timeout=timeout, start_method=start_method, **ddp_kwargs)  # type: ignore[arg-type]
        self.eval_on = eval_on
        self.final_sync = final_sync
        self.loss_window = loss_window
        self.bucket_cap_bytes = int(bucket_cap_mb * 1024 * 1024)

        self.comm = CommMeter()
        self.round_metrics: dict[str, float] = {}  # what the last round logged (also handy in tests)
        self.resets = 0  # times this worker diverged and was reset to the reference model
        self.scores: ScoreWindow | None = None
        self._steps = 0  # real optimizer steps since the start of training (restored on resume)
        self._layout: FlatLayout | None = None
        self._stashed_own: list[Tensor] | None = None  # own weights while the reference model is swapped in
        self._resumed_state: dict[str, Any] | None = None  # strategy state read from this rank's shard
        self._resumed_main_state_dict: dict[str, Any] | None = None  # the main file's reference model, on resume
        self._evaluating_checkpoint = False  # an evaluation loaded a checkpoint: its weights are what is evaluated
        self._warned_no_loss = False

    @classmethod
    def evaluated_models(cls) -> tuple[str, ...]:
        """The values ``eval_on`` accepts."""
        return (cls.reference_name, "local")

    # ------------------------------------------------------------------------------------------------ algorithm
    @abstractmethod
    def _after_local_step(self) -> None:
        """Called on every rank after each real optimizer step (``self.steps`` already counts it)."""

    @abstractmethod
    def _reference_weights(self) -> list[Tensor]:
        """Packed weights of the reference model, one flat tensor per bucket of :attr:`layout` (a collective)."""

    def _extra_state_dict(self) -> dict[str, Any]:
        """Algorithm state that a shard must hold for an exact resume (e.g. EASGD's center)."""
        return {}

    def _load_extra_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`_extra_state_dict` saved; called in ``setup`` once the layout exists."""

    def _on_fresh_start(self) -> None:
        """Called in ``setup`` when training starts without a shard to resume from, after the identical start."""

    def _check_world_size(self, world_size: int) -> None:
        """Validate settings that depend on the number of workers (raise ``ValueError``)."""

    def _comm_metrics(self) -> dict[str, float]:
        return self.comm.metrics()

    def _timeout_s(self) -> float:
        return self._timeout.total_seconds() if self._timeout is not None else 1800.0

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def layout(self) -> FlatLayout:
        if self._layout is None:
            raise RuntimeError(f"{type(self).__name__} is not set up yet.")
        return self._layout

    @property
    def steps(self) -> int:
        """Real optimizer steps taken since training started (the round schedule counts these)."""
        return self._steps

    @property
    def collectives(self) -> Collectives:
        return Collectives(self.comm, self.root_device)

    def _window(self) -> ScoreWindow:
        self.scores = self.scores or ScoreWindow(self.loss_window, self.root_device)  # unit tests: before setup
        return self.scores

    def local_score(self) -> Tensor:
        """Mean of the last ``min(loss_window, losses seen)`` training losses; +inf if none or non-finite."""
        return self._window().score()

    def is_diverged(self) -> bool:
        """Whether a recent training loss or any floating-point weight of this worker is non-finite (under fp16
        loss scaling only the weights: a non-finite loss there is a step the scaler skips)."""
        return self._window().diverged(self._floating_tensors(), losses=not self._loss_scaled())

    def round_score(self) -> Tensor:
        """The score a worker sends in a round: NaN marks a diverged worker (never elected, reset), +inf one
        without a finite loss yet (never elected), else :meth:`local_score`."""
        return self._window().round_score(self._floating_tensors(), losses=not self._loss_scaled())

    def _floating_tensors(self) -> list[Tensor]:
        return [t for b in self.layout.floating_buckets for t in b.tensors]

    def _loss_scaled(self) -> bool:
        return getattr(self.precision_plugin, "scaler", None) is not None

    def _reset_to(self, flats: list[Tensor], reference: str) -> None:
        """Recover a diverged worker: take the reference weights, fresh optimizer state, an empty loss window."""
        self.layout.unpack(flats)
        for optimizer in self.optimizers:
            optimizer.state.clear()  # momentum (or Adam's moments) may be non-finite too
        self._window().clear()
        self.resets += 1
        owner = "parameter holder" if reference == "parameters" else reference
        warnings.warn(
            f"rank {self.global_rank} diverged (non-finite loss or weights) and was reset to the {owner}'s "
            f"weights with fresh optimizer state after step {self.steps}.",
            RuntimeWarning,
            stacklevel=2,
        )

    def _raise_all_diverged(self) -> None:
        raise all_diverged_error(type(self).__name__, self.steps)

    # ------------------------------------------------------------------------------------------------ lifecycle
    @override
    def _configure_launcher(self) -> None:
        # Lightning calls this last while building the Trainer, once devices, nodes and sync_batchnorm are known:
        # the place to refuse bad combinations before any process or process group exists.
        refuse_sync_batchnorm(type(self).__name__, self._layer_sync)
        self._check_world_size(self.num_nodes * self.num_processes)
        super()._configure_launcher()

    @override
    def setup_environment(self) -> None:
        if self.num_nodes * self.num_processes == 1:
            rank_zero_warn(
                f"{type(self).__name__} runs with a single worker: no communication, only the local updates."
            )
        limit_cpu_threads(self.num_processes, self.parallel_devices)
        super().setup_environment()

    @override
    def configure_ddp(self) -> None:
        """Never wrap in DistributedDataParallel: the replicas must not all-reduce gradients."""

    @override
    def _register_ddp_hooks(self) -> None:
        pass

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting or (self._steps == 0 and not self._evaluating_checkpoint):
            super().setup(trainer)  # outside fitting this broadcasts rank 0's weights (all equal there)
        else:
            # Evaluating after `fit` in the same process, or a checkpoint loaded before `setup` (each rank's own
            # shard with eval_on="local"): keep each rank's weights, so DDPStrategy's rank-0 broadcast must not
            # overwrite them.
            assert self.accelerator is not None
            self.accelerator.setup(trainer)
            self.precision_plugin.convert_module(self.model)
            self.model_to_device()
            self.setup_precision_plugin()
        assert self.lightning_module is not None
        self._layout = FlatLayout(self.lightning_module, self.bucket_cap_bytes)
        self._supervise(trainer)
        if not fitting:
            return
        self.scores = ScoreWindow(self.loss_window, self.root_device)
        if self._resumed_state is None:
            self._steps = 0
            self.comm = CommMeter()
            if self.world_size > 1:  # identical start: rank 0's weights (not counted, like DDP's broadcast)
                self.layout.broadcast_(src=0)
            self._on_fresh_start()
        else:
            ckpt.load_strategy_state(self, self._resumed_state)

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        assert self.lightning_module is not None
        trainer = self.lightning_module.trainer
        check_equal_epoch_lengths(trainer.num_training_batches, self.root_device, type(self).__name__)
        if self._resumed_state is not None:
            ckpt.set_rng_state(self._resumed_state.get("rng", {}), self.root_device)
            self._resumed_state = None

    @override
    def on_train_end(self) -> None:
        if self.final_sync and self.world_size > 1:
            self.layout.unpack(self._reference_weights())

    @override
    def teardown(self) -> None:
        self._restore_own_weights()
        self._resumed_state = None
        self._resumed_main_state_dict = None
        super().teardown()

    # ------------------------------------------------------------------------------------------------ training
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        output = super().training_step(*args, **kwargs)
        self._record_loss(output)
        return output

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        with self._local_step(optimizer):
            output = super().optimizer_step(optimizer, closure, model, **kwargs)
            # Counted even when the precision plugin skipped the step (inf gradients), so ranks stay aligned.
            self._steps += 1
            self._after_local_step()
        return output

    def _local_step(self, optimizer: Optimizer) -> AbstractContextManager[None]:
        """Context around a local step and what follows it (e.g. remember the weights from before the step)."""
        return nullcontext()

    def _record_loss(self, output: Any) -> None:
        if not self._window().record_output(output) and not self._warned_no_loss:
            self._warned_no_loss = True
            rank_zero_warn(
                f"{type(self).__name__}: training_step returned no scalar loss, so {self._without_loss}. Return the "
                "loss from training_step, also in manual optimization."
            )

    def _run_round(self, round_: Callable[[], dict[str, float] | None], log: bool = True) -> None:
        """Run one round on every rank (a collective); count it unless it returns ``None`` (skipped), and log it
        (``log=False`` where Lightning allows no logging, e.g. at the end of training)."""
        if self.world_size == 1:
            return
        metrics = round_()
        if metrics is None:
            return
        self.comm.rounds += 1
        self.round_metrics = {**metrics, **self._comm_metrics(), "health/resets": float(self.resets)}
        if log:
            log_rank_local(self.lightning_module, self.round_metrics)

    # ------------------------------------------------------------------------------------------------ evaluation
    def _swap_in_reference(self) -> None:
        # All ranks agree on `_steps` and on whether a checkpoint was loaded, so all of them enter (or skip) the
        # collective together. A loaded checkpoint's main file already is the reference model.
        if self.eval_on == "local" or self.world_size == 1 or self._steps == 0 or self._stashed_own is not None:
            return
        if self._evaluating_checkpoint:
            return
        reference = self._reference_weights()
        self._stashed_own = self.layout.pack()
        self.layout.unpack(reference)

    def _restore_own_weights(self) -> None:
        """End of an evaluation: this rank's own weights back (if the reference was swapped in)."""
        if self._stashed_own is not None:
            self.layout.unpack(self._stashed_own)
            self._stashed_own = None
        self._evaluating_checkpoint = False

    @override
    def on_validation_start(self) -> None:
        self._swap_in_reference()

    @override
    def on_validation_end(self) -> None:
        self._restore_own_weights()

    @override
    def on_test_start(self) -> None:
        self._swap_in_reference()

    @override
    def on_test_end(self) -> None:
        self._restore_own_weights()

    @override
    def on_predict_start(self) -> None:
        self._swap_in_reference()

    @override
    def on_predict_end(self) -> None:
        self._restore_own_weights()

    # ------------------------------------------------------------------------------------------------ checkpoints
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Every rank writes its own shard, then rank 0 the main file with the reference model (see
        :func:`~.checkpoints.save_sharded`)."""
        if self._layout is None or self.lightning_module is None:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        if self._job is not None and self._job.handling_failure():
            self._job.warn_checkpoint_skipped()  # a lone failing rank: the others will not join the collectives
            return
        ckpt.save_sharded(self, checkpoint, filepath, storage_options)

    @override
    def remove_checkpoint(self, filepath: _PATH) -> None:
        ckpt.remove_sharded(self, filepath)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """The main file; when fitting, with this rank's own shard in it (see :func:`~.checkpoints.load_sharded`)."""
        checkpoint = ckpt.load_main_checkpoint(super().load_checkpoint, checkpoint_path, weights_only)
        return ckpt.load_sharded(self, checkpoint, checkpoint_path)
