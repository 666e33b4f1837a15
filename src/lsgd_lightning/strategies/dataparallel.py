"""Data-parallel SGD, the baseline: Lightning's DDP with the package's communication accounting.

Every step, after each worker's backward pass, the gradients are averaged over all P workers::

    g <- (1/P) Σ_j g_j          x_i <- optimizer_step(x_i, g)   (identical on every worker)

Communicated per step and worker: one all-reduce of all gradients, 4·d bytes for d float32 parameters, run by DDP's
own C++ all-reduce in gradient buckets, overlapped with the backward pass (exactly Lightning's ``"ddp"``). Since DDP
reduces every bucket every step, ``comm/bytes`` is counted from the buckets' sizes without touching the reduction.
``comm/seconds`` is measured only when asked (``time_communication=True``): a Python communication hook then times
each bucket from its launch to its completion (CUDA events on GPU), at the cost of a few milliseconds per step.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations at runtime.
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.distributed import GradBucket
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from ..core.collectives import CommMeter, payload_bytes
from .checkpoints import CHECKPOINT_META_KEY, load_main_checkpoint
from .checks import check_bool, check_equal_epoch_lengths
from .metrics import log_rank_local
from .supervised import SupervisedStrategy


@dataclass
class _HookState:
    meter: CommMeter
    device: torch.device


def _timed_allreduce_hook(state: _HookState, bucket: GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average a gradient bucket like DDP's built-in path (divide, then sum) and time it from launch to completion."""
    buffer = bucket.buffer()
    cuda = state.device.type == "cuda"
    start = time.perf_counter()
    if cuda:
        begin = torch.cuda.Event(enable_timing=True)
        begin.record()
    buffer.div_(dist.get_world_size())
    future = dist.all_reduce(buffer, async_op=True).get_future()

    def finished(fut: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        if cuda:  # this callback's current stream waits for the reduction: the event marks its end
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            state.meter._pending.append((begin, end))
        else:
            state.meter.seconds += time.perf_counter() - start
        return fut.value()[0]

    return future.then(finished)


class DataParallelStrategy(SupervisedStrategy):
    """Lightning's DDP (gradient all-reduce every step) with ``comm/bytes``, ``comm/rounds`` and, when asked,
    ``comm/seconds``.

    Args:
        time_communication: install a timing communication hook so that ``comm/seconds`` is measured (slower by a
            Python callback per bucket); default ``False``: DDP's own C++ all-reduce, as Lightning's ``"ddp"``.
        **ddp_kwargs: every ``DDPStrategy`` argument except a communication hook of its own.

    Training stops with a ``RuntimeError`` once the averaged gradients are non-finite (every replica got them, so
    every worker diverged); it is checked on the device and read at most every ``log_every_n_steps`` steps (the
    message names the step). Registered as ``"dataparallel"`` and ``"dataparallel_spawn"``.
    """

    strategy_name = "dataparallel"

    def __init__(self, time_communication: bool = False, **ddp_kwargs: Any) -> None:
        check_bool("time_communication", time_communication)
        hook_args = {"ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper", "model_averaging_period"}
        taken = sorted(hook_args & set(ddp_kwargs))
        if taken:
            raise TypeError(
                f"DataParallelStrategy counts the all-reduce's bytes itself (and times it with its own hook), so it "
                f"does not take {', '.join(taken)}; use Lightning's DDPStrategy for custom hooks."
            )
        super().__init__(**ddp_kwargs)
        self.time_communication = time_communication
        self.comm = CommMeter()
        self.round_metrics: dict[str, float] = {}
        self._bucket_bytes = 0  # what DDP all-reduces every step
        self._first_nonfinite: torch.Tensor | None = None  # on the device: the first step with non-finite gradients
        self._device_step: torch.Tensor | None = None  # on the device: optimizer steps since training started
        self._resumed_comm: dict[str, Any] | None = None

    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        super().setup(trainer)
        self._supervise(trainer)

    @override
    def _register_ddp_hooks(self) -> None:
        assert isinstance(self.model, DistributedDataParallel)
        self.comm = CommMeter()
        if self._resumed_comm is not None:  # restored before setup, applied once the meter exists
            self.comm.load_state_dict(self._resumed_comm)
            self._resumed_comm = None
        # DDP reduces every gradient bucket every step (unused parameters' buckets included): their total is static.
        self._bucket_bytes = sum(payload_bytes(p) for p in self.model.parameters() if p.requires_grad)
        if self.time_communication:
            self.model.register_comm_hook(state=_HookState(self.comm, self.root_device), hook=_timed_allreduce_hook)

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: "pl.LightningModule | torch.nn.Module | None" = None,
        **kwargs: Any,
    ) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        self.comm.rounds += 1
        self.comm.count(self._bucket_bytes)
        self._track_nonfinite_gradients(optimizer)
        self.round_metrics = self.comm.metrics() if self.time_communication else self._untimed_metrics()
        log_rank_local(self.lightning_module, self.round_metrics)
        return output

    def _untimed_metrics(self) -> dict[str, float]:
        return {"comm/bytes": float(self.comm.bytes), "comm/rounds": float(self.comm.rounds)}

    def _track_nonfinite_gradients(self, optimizer: Optimizer) -> None:
        """Remember, on the device, the first step whose averaged gradients were non-finite; raise once it is read.

        Skipped under fp16 loss scaling, whose scaler expects inf gradients and skips those steps itself. The host
        reads the flag every ``log_every_n_steps`` steps, so a healthy step costs no host synchronization.
        """
        if getattr(self.precision_plugin, "scaler", None) is not None:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        finite = torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
        if self._first_nonfinite is None:  # both counters live on the device: no host-to-device copy per step
            self._first_nonfinite = torch.zeros((), dtype=torch.long, device=self.root_device)
            self._device_step = torch.zeros((), dtype=torch.long, device=self.root_device)
        self._device_step += 1
        first = self._first_nonfinite
        self._first_nonfinite = torch.where(~finite & (first == 0), self._device_step, first)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if self.comm.rounds % max(1, trainer.log_every_n_steps if trainer is not None else 1) == 0:
            self.check_gradients()

    def check_gradients(self) -> None:
        """Raise if a step had non-finite averaged gradients (a host synchronization)."""
        bad = int(self._first_nonfinite) if self._first_nonfinite is not None else 0
        if bad:
            raise RuntimeError(
                f"DataParallelStrategy: the averaged gradients became non-finite at step {bad}, so every worker "
                "diverged (data-parallel workers share one model). A worker's loss was inf or NaN: lower the learning "
                "rate, add gradient clipping (Trainer(gradient_clip_val=...)), or resume from an earlier checkpoint."
            )

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        assert self.lightning_module is not None
        check_equal_epoch_lengths(self.lightning_module.trainer.num_training_batches, self.root_device, "DataParallel")
        self._first_nonfinite = None

    @override
    def on_train_end(self) -> None:
        self.check_gradients()

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        # The replicas are identical, so Lightning's rank-0 checkpoint is complete; only the counters are added.
        checkpoint[CHECKPOINT_META_KEY] = {"strategy": self.strategy_name, "comm": self.comm.state_dict()}
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = load_main_checkpoint(super().load_checkpoint, checkpoint_path, weights_only)
        meta = checkpoint.get(CHECKPOINT_META_KEY) or {}
        self._resumed_comm = meta.get("comm") if meta.get("strategy") == self.strategy_name else None
        return checkpoint
