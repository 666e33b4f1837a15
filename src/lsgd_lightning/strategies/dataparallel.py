"""Data-parallel SGD, the baseline: Lightning's DDP with the package's communication accounting.

Every step, after each worker's backward pass, the gradients are averaged over all P workers::

    g <- (1/P) Σ_j g_j          x_i <- optimizer_step(x_i, g)   (identical on every worker)

Communicated per step and worker: one all-reduce of all gradients, 4·d bytes for d float32 parameters. The
reduction runs in DDP's gradient buckets, overlapped with the backward pass; a DDP communication hook counts each
bucket's bytes and the time from its launch to its completion. Lightning registers DDP comm hooks only on CUDA;
this strategy registers its own on every device, so the numbers exist on CPU (gloo) too.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations at runtime.
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.strategies import _StrategyRegistry
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed import GradBucket
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from ._comm import CommMeter, payload_bytes
from ._failures import FailureBoard, check_equal_epoch_lengths, handle_worker_exception, new_board
from ._registration import log_rank_local, register_launcher_variants
from .periodic import CHECKPOINT_META_KEY, load_main_checkpoint


@dataclass
class _HookState:
    meter: CommMeter
    nonfinite_buckets: list[torch.Tensor] = field(default_factory=list)  # one flag per reduced bucket this step


def _accounted_allreduce_hook(state: _HookState, bucket: GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average a gradient bucket like DDP's built-in path (divide, then sum), count it, and flag non-finite values."""
    buffer = bucket.buffer()
    state.meter.bytes += payload_bytes(buffer)
    start = time.perf_counter()
    buffer.div_(dist.get_world_size())
    future = dist.all_reduce(buffer, async_op=True).get_future()

    def finished(fut: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        state.meter.seconds += time.perf_counter() - start
        reduced = fut.value()[0]
        state.nonfinite_buckets.append(~torch.isfinite(reduced).all())  # stays on the device: no sync here
        return reduced

    return future.then(finished)


class DataParallelStrategy(DDPStrategy):
    """Lightning's DDP (gradient all-reduce every step) with ``comm/bytes``, ``comm/seconds`` and ``comm/rounds``.

    Takes every ``DDPStrategy`` argument except a communication hook of its own (it installs the accounting hook).
    Registered as ``"dataparallel"`` (subprocess launcher) and ``"dataparallel_spawn"`` (spawn launcher).
    """

    strategy_name = "dataparallel"

    def __init__(self, **ddp_kwargs: Any) -> None:
        hook_args = {"ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper", "model_averaging_period"}
        taken = sorted(hook_args & set(ddp_kwargs))
        if taken:
            raise TypeError(
                f"DataParallelStrategy installs its own accounting communication hook, so it does not take "
                f"{', '.join(taken)}; use Lightning's DDPStrategy for custom hooks."
            )
        super().__init__(**ddp_kwargs)
        self.comm = CommMeter()
        self.round_metrics: dict[str, float] = {}
        self._failure_board: FailureBoard | None = None
        self._resumed_comm: dict[str, Any] | None = None

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        register_launcher_variants(strategy_registry, cls, cls.strategy_name)

    def _check_finite_gradients(self) -> None:
        """Stop on non-finite averaged gradients: every replica got the same ones, so all workers diverged.

        Skipped under fp16 loss scaling, whose scaler expects inf gradients and skips those steps itself.
        """
        state = getattr(self, "_hook_state", None)
        if state is None or not state.nonfinite_buckets:
            return
        flags, state.nonfinite_buckets = state.nonfinite_buckets, []
        if getattr(self.precision_plugin, "scaler", None) is not None:
            return
        if bool(torch.stack(flags).any()):
            raise RuntimeError(
                f"DataParallelStrategy: the averaged gradients became non-finite at step {self.comm.rounds + 1}, "
                "so every worker diverged (data-parallel workers share one model). A worker's loss was inf or NaN: "
                "lower the learning rate, add gradient clipping (Trainer(gradient_clip_val=...)), or resume from an "
                "earlier checkpoint."
            )

    def setup(self, trainer: "pl.Trainer") -> None:
        super().setup(trainer)
        self._failure_board = new_board(self.global_rank, self.world_size, self._timeout)

    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        handle_worker_exception(self._failure_board, exception)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        # The replicas are identical, so Lightning's rank-0 checkpoint is complete; only the counters are added.
        checkpoint[CHECKPOINT_META_KEY] = {"strategy": self.strategy_name, "comm": self.comm.state_dict()}
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = load_main_checkpoint(super().load_checkpoint, checkpoint_path, weights_only)
        meta = checkpoint.get(CHECKPOINT_META_KEY) or {}
        self._resumed_comm = meta.get("comm") if meta.get("strategy") == self.strategy_name else None
        return checkpoint

    def on_train_start(self) -> None:
        assert self.lightning_module is not None
        check_equal_epoch_lengths(self.lightning_module.trainer.num_training_batches, self.root_device, "DataParallel")

    def _register_ddp_hooks(self) -> None:
        assert isinstance(self.model, DistributedDataParallel)
        self.comm = CommMeter()
        if self._resumed_comm is not None:  # restored before setup, applied once the meter exists
            self.comm.load_state_dict(self._resumed_comm)
            self._resumed_comm = None
        self._hook_state = _HookState(self.comm)
        self.model.register_comm_hook(state=self._hook_state, hook=_accounted_allreduce_hook)

    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: "pl.LightningModule | torch.nn.Module | None" = None,
        **kwargs: Any,
    ) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        self._check_finite_gradients()
        self.comm.rounds += 1
        self.round_metrics = self.comm.metrics()
        log_rank_local(self.lightning_module, self.round_metrics)
        return output
