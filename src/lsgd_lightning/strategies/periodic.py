"""The shared base of the periodic-communication strategies (Leader SGD, EASGD, ...).

Every worker trains its own replica with its own optimizer on its own data shard; there is no gradient
communication. After every ``tau``-th optimizer step the subclass runs one *communication round*
(:meth:`PeriodicCommunicationStrategy._communication_round`) that moves the replicas toward a *reference model*
(the leader for LSGD, the center variable for EASGD). Everything else lives here, once:

- lifecycle on top of Lightning's :class:`~lightning.pytorch.strategies.DDPStrategy` (process groups, both
  launchers, cluster environments, ``DistributedSampler`` injection), without the DDP wrapper;
- identical start (rank 0's weights), counting real optimizer steps (never accumulation micro-batches) and the
  per-rank window of training losses;
- evaluation on the reference model (swapped in for validation/test/predict, the rank's own weights restored
  afterwards) and the final sync at the end of ``fit``;
- sharded, atomic checkpoints: each rank saves its own shard, the main file holds the reference model;
- flat-buffer collectives and the ``comm/*`` accounting.

A new algorithm is one subclass implementing ``_communication_round`` and ``_reference_weights``.
"""

from __future__ import annotations

import math
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from ._comm import Collectives, CommMeter, all_gather_single
from ._failures import FailureBoard, check_equal_epoch_lengths, handle_worker_exception, new_board
from ._flat import FlatLayout, state_dict_with
from ._registration import log_rank_local, register_launcher_variants

SHARD_FORMAT = "lsgd_lightning.shard.v1"
CHECKPOINT_META_KEY = "lsgd_lightning"


def shard_dir(checkpoint_path: _PATH) -> Path:
    """Where the per-rank shards of the checkpoint at ``checkpoint_path`` live."""
    return Path(f"{os.fspath(checkpoint_path)}.shards")


def shard_path(checkpoint_path: _PATH, rank: int) -> Path:
    return shard_dir(checkpoint_path) / f"rank_{rank:05d}.pt"


def atomic_torch_save(obj: Any, path: Path, save: Callable[[Any, Path], None] | None = None) -> None:
    """Write ``obj`` to a temporary file beside ``path`` and rename it into place.

    A crash mid-write leaves at most a stray ``*.tmp`` file, never a truncated ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        (save or torch.save)(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class PeriodicCommunicationStrategy(DDPStrategy, ABC):
    """Base class: local SGD on every worker plus a communication round every ``tau`` optimizer steps.

    Args:
        tau: optimizer steps between communication rounds (>= 1).
        eval_on: which weights validation/test/predict see: the algorithm's reference model
            (``reference_name``, e.g. ``"leader"``) swapped into every rank, or ``"local"`` (each rank its own).
        final_sync: when ``fit`` ends, every worker takes the reference model's weights.
        loss_window: how many recent training losses make a worker's score.
        bucket_cap_mb: largest flat buffer sent in one collective (MiB).
        ddp_kwargs: Lightning ``DDPStrategy`` arguments that concern processes, not the DDP wrapper.

    Subclasses set ``strategy_name`` and ``reference_name`` and implement :meth:`_communication_round` and
    :meth:`_reference_weights`.
    """

    strategy_name: ClassVar[str]
    reference_name: ClassVar[str]
    # DDPStrategy arguments that make sense without the DDP wrapper; anything else is refused by name.
    _ACCEPTED_DDP_KWARGS: ClassVar[frozenset[str]] = frozenset(
        {"accelerator", "parallel_devices", "cluster_environment", "checkpoint_io", "precision_plugin"}
        | {"process_group_backend", "timeout", "start_method"}
    )
    _loss_window_arg: ClassVar[str] = "loss_window"  # the constructor's name for it, used in error messages

    def __init__(
        self,
        tau: int = 16,
        eval_on: str | None = None,
        final_sync: bool = True,
        loss_window: int = 10,
        bucket_cap_mb: float = 25.0,
        *,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: str = "popen",
        **unsupported: Any,
    ) -> None:
        if unsupported:
            names = ", ".join(sorted(unsupported))
            raise TypeError(
                f"{type(self).__name__} got unsupported argument(s) {names}: it never wraps the model in "
                f"DistributedDataParallel, so only these DDPStrategy arguments apply: "
                f"{', '.join(sorted(self._ACCEPTED_DDP_KWARGS))}."
            )
        eval_on = self.reference_name if eval_on is None else eval_on
        _check_int("tau", tau, minimum=1)
        _check_int(self._loss_window_arg, loss_window, minimum=1)
        if eval_on not in (self.reference_name, "local"):
            raise ValueError(f"eval_on must be {self.reference_name!r} or 'local', got {eval_on!r}.")
        if not isinstance(final_sync, bool):
            raise ValueError(f"final_sync must be True or False, got {final_sync!r}.")
        if not (isinstance(bucket_cap_mb, (int, float)) and bucket_cap_mb > 0):
            raise ValueError(f"bucket_cap_mb must be a positive number of MiB, got {bucket_cap_mb!r}.")
        if start_method not in ("popen", "spawn", "fork", "forkserver"):
            raise ValueError(f"start_method must be 'popen', 'spawn', 'fork' or 'forkserver', got {start_method!r}.")
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,  # type: ignore[arg-type]
        )
        self.tau = tau
        self.eval_on = eval_on
        self.final_sync = final_sync
        self.loss_window = loss_window
        self.bucket_cap_bytes = int(bucket_cap_mb * 1024 * 1024)

        self.comm = CommMeter()
        self.round_metrics: dict[str, float] = {}  # what the last round logged (also handy in tests)
        self._steps = 0  # real optimizer steps since the start of training (restored on resume)
        self._losses: Tensor | None = None  # ring buffer of the last `loss_window` training losses
        self._losses_seen = 0
        self._pending_rounds = 0  # rounds due during a manual-optimization training_step
        self._layout: FlatLayout | None = None
        self._stashed_own: list[Tensor] | None = None  # own weights while the reference model is swapped in
        self._resumed_state: dict[str, Any] | None = None  # strategy state read from this rank's shard
        self._resumed_main_state_dict: dict[str, Any] | None = None  # the main file's reference model, on resume
        self._warned_no_loss = False
        self._failure_board: FailureBoard | None = None
        self.resets = 0  # times this worker diverged and was reset to the reference model

    # ------------------------------------------------------------------------------------------------------------
    # Algorithm interface
    # ------------------------------------------------------------------------------------------------------------
    @abstractmethod
    def _communication_round(self) -> dict[str, float] | None:
        """Run one round on every rank (a collective: all ranks call it together).

        Returns the metrics to log, or ``None`` if the round was skipped (it then does not count as a round).
        """

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

    def _round_due(self, step: int) -> bool:
        """Whether a communication round follows optimizer step ``step`` (1-based)."""
        return step % self.tau == 0

    def _comm_metrics(self) -> dict[str, float]:
        return self.comm.metrics()

    # ------------------------------------------------------------------------------------------------------------
    # Properties
    # ------------------------------------------------------------------------------------------------------------
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

    def is_diverged(self) -> bool:
        """Whether a recent training loss or any floating-point weight of this worker is non-finite."""
        seen = min(self._losses_seen, self.loss_window)
        if self._losses is not None and seen > 0 and not bool(torch.isfinite(self._losses[:seen]).all()):
            return True
        finite = [torch.isfinite(t).all() for b in self.layout.floating_buckets for t in b.tensors]
        return bool(finite) and not bool(torch.stack(finite).all())

    def round_score(self) -> Tensor:
        """The score a worker sends in a round: NaN marks a diverged worker (never elected, reset), +inf one
        without a finite loss yet (never elected), else :meth:`local_score`."""
        if self.is_diverged():
            return torch.tensor(math.nan, device=self.root_device)
        return self.local_score()

    def _reset_to(self, flats: list[Tensor], reference: str) -> None:
        """Recover a diverged worker: take the reference weights, fresh optimizer state, an empty loss window."""
        self.layout.unpack(flats)
        for optimizer in self.optimizers:
            optimizer.state.clear()  # momentum (or Adam's moments) may be non-finite too
        self._losses_seen = 0
        self.resets += 1
        warnings.warn(
            f"rank {self.global_rank} diverged (non-finite loss or weights) and was reset to the {reference}'s "
            f"weights with fresh optimizer state after step {self.steps}.",
            RuntimeWarning,
            stacklevel=2,
        )

    def _raise_all_diverged(self) -> None:
        raise RuntimeError(
            f"{type(self).__name__}: every worker diverged (non-finite training loss or weights) by step "
            f"{self.steps}; nothing finite is left to recover from. Lower the learning rate, add gradient clipping "
            "(Trainer(gradient_clip_val=...)), or resume from an earlier checkpoint."
        )

    def local_score(self) -> Tensor:
        """Mean of the last ``min(loss_window, losses seen)`` training losses; +inf if none or non-finite."""
        n = min(self._losses_seen, self.loss_window)
        if self._losses is None or n == 0:
            return torch.tensor(math.inf, device=self.root_device)
        score = self._losses[:n].mean()
        return torch.where(torch.isfinite(score), score, torch.full_like(score, math.inf))

    # ------------------------------------------------------------------------------------------------------------
    # Lifecycle
    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        register_launcher_variants(strategy_registry, cls, cls.strategy_name)

    def _configure_launcher(self) -> None:
        # Lightning calls this last while building the Trainer, once devices, nodes and sync_batchnorm are known:
        # the place to refuse bad combinations before any process or process group exists.
        if self._layer_sync is not None:
            raise ValueError(
                f"{type(self).__name__} does not support Trainer(sync_batchnorm=True): SyncBatchNorm communicates "
                "on every forward pass, which defeats periodic communication. Use sync_batchnorm=False; each "
                "worker then keeps its own BatchNorm statistics, which the rounds mix like other buffers."
            )
        self._check_world_size(self.num_nodes * self.num_processes)
        super()._configure_launcher()

    def setup_environment(self) -> None:
        if self.num_nodes * self.num_processes == 1:
            rank_zero_warn(
                f"{type(self).__name__} runs with a single worker: no communication, only the local updates."
            )
        _limit_cpu_threads(self.num_processes, self.parallel_devices)
        super().setup_environment()

    def configure_ddp(self) -> None:
        """Never wrap in DistributedDataParallel: the replicas must not all-reduce gradients."""

    def _register_ddp_hooks(self) -> None:
        pass

    def setup(self, trainer: pl.Trainer) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting or self._steps == 0:
            super().setup(trainer)  # outside fitting this broadcasts rank 0's weights (all equal there)
        else:
            # Evaluating after `fit` in the same process: keep each rank's own weights (the reference model is
            # swapped in for evaluation), so DDPStrategy's rank-0 broadcast must not overwrite them.
            assert self.accelerator is not None
            self.accelerator.setup(trainer)
            self.precision_plugin.convert_module(self.model)
            self.model_to_device()
            self.setup_precision_plugin()
        assert self.lightning_module is not None
        self._layout = FlatLayout(self.lightning_module, self.bucket_cap_bytes)
        self._failure_board = new_board(self.global_rank, self.world_size, self._timeout)
        if not fitting:
            return
        self._losses = torch.zeros(self.loss_window, device=self.root_device)
        if self._resumed_state is None:
            self._steps, self._losses_seen, self._pending_rounds = 0, 0, 0
            self.comm = CommMeter()
            self._broadcast_rank_zero_weights()
            self._on_fresh_start()
        else:
            self._load_base_state(self._resumed_state)
            self._load_extra_state_dict(self._resumed_state.get("extra", {}))

    def _broadcast_rank_zero_weights(self) -> None:
        """Identical start: every rank takes rank 0's parameters and buffers (one flat broadcast per bucket).

        Not counted in ``comm/bytes``: it is a one-off start-up cost, like DDP's constructor broadcast.
        """
        if self.world_size == 1:
            return
        for bucket in self.layout.buckets:
            flat = bucket.pack()
            dist.broadcast(flat, src=0)
            bucket.unpack(flat)

    def on_train_start(self) -> None:
        assert self.lightning_module is not None
        check_equal_epoch_lengths(
            self.lightning_module.trainer.num_training_batches, self.root_device, type(self).__name__
        )
        if self._resumed_state is not None:
            _set_rng_state(self._resumed_state.get("rng", {}), self.root_device)
            self._resumed_state = None

    def on_train_end(self) -> None:
        if self.final_sync and self.world_size > 1:
            self.layout.unpack(self._reference_weights())

    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        handle_worker_exception(self._failure_board, exception)

    def teardown(self) -> None:
        self._restore_own_weights()
        self._resumed_state = None
        self._resumed_main_state_dict = None
        super().teardown()

    # ------------------------------------------------------------------------------------------------------------
    # Training: record losses, count steps, run rounds
    # ------------------------------------------------------------------------------------------------------------
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        output = super().training_step(*args, **kwargs)
        self._record_loss(output)
        # Manual optimization steps inside training_step, before the loss is returned: run the due rounds now,
        # so the score includes this step's loss exactly as in automatic optimization.
        while self._pending_rounds > 0:
            self._pending_rounds -= 1
            self._run_round()
        return output

    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        # Counted even when the precision plugin skipped the step (inf gradients), so ranks stay aligned.
        self._steps += 1
        if self._round_due(self._steps):
            assert self.lightning_module is not None
            if self.lightning_module.automatic_optimization:
                self._run_round()
            else:
                self._pending_rounds += 1
        return output

    def _record_loss(self, output: Any) -> None:
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            if not self._warned_no_loss:
                self._warned_no_loss = True
                rank_zero_warn(
                    f"{type(self).__name__}: training_step returned no scalar loss, so this worker's score stays "
                    "+inf (it cannot be elected). Return the loss from training_step, also in manual optimization."
                )
            return
        assert self._losses is not None
        self._losses[self._losses_seen % self.loss_window] = loss.detach().reshape(())
        self._losses_seen += 1

    def _run_round(self) -> None:
        if self.world_size == 1:
            return
        metrics = self._communication_round()
        if metrics is None:
            return
        self.comm.rounds += 1
        self.round_metrics = {**metrics, **self._comm_metrics(), "health/resets": float(self.resets)}
        log_rank_local(self.lightning_module, self.round_metrics)

    # ------------------------------------------------------------------------------------------------------------
    # Evaluation on the reference model
    # ------------------------------------------------------------------------------------------------------------
    def _swap_in_reference(self) -> None:
        # All ranks agree on `_steps`, so all of them enter (or skip) the collective together.
        if self.eval_on == "local" or self.world_size == 1 or self._steps == 0 or self._stashed_own is not None:
            return
        reference = self._reference_weights()
        self._stashed_own = self.layout.pack()
        self.layout.unpack(reference)

    def _restore_own_weights(self) -> None:
        if self._stashed_own is not None:
            self.layout.unpack(self._stashed_own)
            self._stashed_own = None

    def on_validation_start(self) -> None:
        self._swap_in_reference()

    def on_validation_end(self) -> None:
        self._restore_own_weights()

    def on_test_start(self) -> None:
        self._swap_in_reference()

    def on_test_end(self) -> None:
        self._restore_own_weights()

    def on_predict_start(self) -> None:
        self._swap_in_reference()

    def on_predict_end(self) -> None:
        self._restore_own_weights()

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints: one shard per rank + a main file holding the reference model
    # ------------------------------------------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Every rank writes its own shard; rank 0 then writes the main file with the reference weights.

        Called on every rank (ModelCheckpoint and ``Trainer.save_checkpoint`` do). The main file is written last,
        after a barrier, so a main file on disk means its shards are complete.
        """
        if self._layout is None or self.lightning_module is None:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(os.fspath(filepath), src=0))  # callers may pass per-rank paths
        module = self.lightning_module
        if self._stashed_own is not None:  # ModelCheckpoint in on_validation_end: the reference is swapped in
            own = state_dict_with(module, self.layout.named_tensors(self._stashed_own))
            reference = module.state_dict()
        else:
            own = module.state_dict()
            reference = (
                state_dict_with(module, self.layout.named_tensors(self._reference_weights()))
                if self.world_size > 1
                else own
            )
        shard = {
            "format": SHARD_FORMAT,
            "strategy": self.strategy_name,
            "rank": self.global_rank,
            "world_size": self.world_size,
            "state_dict": own,
            "optimizer_states": checkpoint.get("optimizer_states", []),
            "lr_schedulers": checkpoint.get("lr_schedulers", []),
            "strategy_state": self._base_state_dict(),
        }
        atomic_torch_save(shard, shard_path(path, self.global_rank))
        self.barrier("lsgd_lightning.save_shards")
        if self.is_global_zero:
            main = dict(checkpoint)
            main["state_dict"] = reference
            main[CHECKPOINT_META_KEY] = {
                "strategy": self.strategy_name,
                "world_size": self.world_size,
                "reference": self.reference_name,
            }
            atomic_torch_save(
                main, path, lambda obj, tmp: self.checkpoint_io.save_checkpoint(obj, tmp, storage_options)
            )
        self.barrier("lsgd_lightning.save_main")

    def remove_checkpoint(self, filepath: _PATH) -> None:
        path = Path(self.broadcast(os.fspath(filepath), src=0))
        shard_path(path, self.global_rank).unlink(missing_ok=True)
        self.barrier("lsgd_lightning.remove_shards")
        if self.is_global_zero:
            self.checkpoint_io.remove_checkpoint(path)
            directory = shard_dir(path)
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Load the main file; when fitting, replace weights and optimizer state by this rank's own shard.

        All ranks decide together (one all-reduce) whether every shard could be read, so a missing or corrupt
        shard raises the same clear error on every rank instead of leaving some ranks waiting in a collective.
        """
        checkpoint = load_main_checkpoint(super().load_checkpoint, checkpoint_path, weights_only)
        meta = checkpoint.get(CHECKPOINT_META_KEY)
        trainer = self.lightning_module._trainer if self.lightning_module is not None else None
        if meta is None or trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return checkpoint  # evaluation, or a plain Lightning checkpoint: its weights are everyone's start
        if meta.get("strategy") != self.strategy_name or int(meta.get("world_size", -1)) != self.world_size:
            rank_zero_warn(
                f"Checkpoint {os.fspath(checkpoint_path)!r} was written by {meta.get('strategy')!r} with "
                f"{meta.get('world_size')} workers; resuming {self.strategy_name!r} with {self.world_size}. Every "
                f"worker starts from the checkpoint's {meta.get('reference', 'reference')} weights."
            )
            return checkpoint
        path = shard_path(checkpoint_path, self.global_rank)
        shard, error = _read_shard(path, self.global_rank, self.world_size)
        failed = self._ranks_that_failed(error is not None)
        if failed:
            detail = f" This rank: {error}." if error else ""
            raise RuntimeError(
                f"Cannot resume from {os.fspath(checkpoint_path)!r}: the shard(s) of rank(s) {failed} are missing "
                f"or unreadable (expected {os.fspath(shard_dir(checkpoint_path))}/rank_NNNNN.pt).{detail} "
                "Resume from an earlier checkpoint whose shards are complete."
            )
        assert shard is not None
        self._resumed_main_state_dict = checkpoint["state_dict"]
        checkpoint["state_dict"] = shard["state_dict"]
        checkpoint["optimizer_states"] = shard["optimizer_states"]
        checkpoint["lr_schedulers"] = shard["lr_schedulers"]
        self._resumed_state = shard["strategy_state"]
        return checkpoint

    def _ranks_that_failed(self, failed_here: bool) -> list[int]:
        flags = torch.tensor([1.0 if failed_here else 0.0], device=self.root_device)
        if self.world_size > 1:
            gathered = torch.empty(self.world_size, device=self.root_device)
            all_gather_single(gathered, flags)
            flags = gathered
        return [rank for rank, flag in enumerate(flags.tolist()) if flag]

    def _base_state_dict(self) -> dict[str, Any]:
        assert self._losses is not None
        return {
            "steps": self._steps,
            "losses": self._losses.detach().cpu().clone(),
            "losses_seen": self._losses_seen,
            "comm": self.comm.state_dict(),
            "rng": _get_rng_state(self.root_device),
            "extra": self._extra_state_dict(),
        }

    def _load_base_state(self, state: Mapping[str, Any]) -> None:
        self._steps = int(state["steps"])
        self._losses_seen = int(state["losses_seen"])
        assert self._losses is not None
        self._losses.copy_(state["losses"].to(self._losses.device))
        self.comm.load_state_dict(state["comm"])
        self._pending_rounds = 0


def load_main_checkpoint(load: Callable[..., dict[str, Any]], path: _PATH, weights_only: bool | None) -> dict[str, Any]:
    """``load(path)`` with an error that names the file when it is missing, truncated or not a checkpoint."""
    try:
        return load(path, weights_only=weights_only)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise RuntimeError(
            f"Checkpoint {os.fspath(path)!r} could not be read ({type(error).__name__}: {str(error)[:300]}). It is "
            "corrupt or incomplete; resume from an earlier checkpoint."
        ) from error


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _read_shard(path: Path, rank: int, world_size: int) -> tuple[dict[str, Any] | None, str | None]:
    if not path.is_file():
        return None, f"{path} does not exist"
    try:
        shard = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or truncated file: report it, never hang the other ranks
        return None, f"{path} could not be read ({type(exc).__name__}: {exc})"
    if not isinstance(shard, dict) or shard.get("format") != SHARD_FORMAT:
        return None, f"{path} is not an lsgd_lightning shard"
    if shard.get("rank") != rank or shard.get("world_size") != world_size:
        return None, f"{path} belongs to rank {shard.get('rank')} of {shard.get('world_size')}"
    return shard, None


def _get_rng_state(device: torch.device) -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Tensor], device: torch.device) -> None:
    if "cpu" in state:
        torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _limit_cpu_threads(local_workers: int, devices: list[torch.device] | None) -> None:
    """Share the CPU cores among the local workers, unless the user chose (``OMP_NUM_THREADS``)."""
    if "OMP_NUM_THREADS" in os.environ or not devices or devices[0].type != "cpu":
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // max(1, local_workers)))
