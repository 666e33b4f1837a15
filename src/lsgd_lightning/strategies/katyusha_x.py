"""Katyusha X (Allen-Zhu, ICML 2018, arXiv:1802.03866) as a data-parallel strategy: SVRG epochs plus one momentum line.

The algorithm, its sources and the symbols are in :mod:`lsgd_lightning.optim` (the paper's pseudo-code box could not
be read here; the module names the public statements used). With P workers and b samples per worker and step::

    start of epoch s (every m optimizer steps):
        s ≥ 1:  x̃_s = x (the current weights);  x ← y_s = (3/2 x̃_s + 1/2 y_{s-1} − (1 − τ) x̃_{s-1}) / (1 + τ)
        snapshot x̃ ← x;  μ̃ = ∇f(x̃): each worker sums its shard's gradients at x̃, one all-reduce, divide by n
    every step, worker i with its batch B_i:
        g_i = ∇f_{B_i}(x) − ∇f_{B_i}(x̃) + μ̃;   x ← x − η · (1/P) Σ_i g_i     (SGD's update; one all-reduce)

so P workers act as one worker with a mini-batch of P·b. Katyusha X saves no communication: it is here as the
data-parallel form of an accelerated variance-reduced method for sums of non-convex components whose average is convex
(PCA/SVD-type problems, regularized Newton steps).

How it runs inside Lightning, with the user's LightningModule unchanged:

- This is :class:`DataParallelStrategy` (Lightning's DDP with the package's accounting and job control), chosen over
  a bare ``DDPStrategy`` because Katyusha X communicates exactly what DDP does, one all-reduce of the gradient per
  step: only *which* gradient is reduced changes. After Lightning's ``zero_grad`` and before the backward pass
  (``pre_backward``) each parameter's ``.grad`` is set to μ̃ − ∇f_B(x̃); the backward pass adds ∇f_B(x) and DDP
  all-reduces the sum, as it does with accumulated gradients. DDP's gradient buckets, its overlap with the backward
  pass, the ``comm/*`` metrics and the divergence check all stay as they are.
- ∇f_B(x̃) is a second forward/backward of the user's ``training_step`` on the same batch, at the snapshot weights
  (copied into the parameters and back), before the forward at x. It runs on the unwrapped module with ``self.log``
  muted, the random number generator forked (dropout draws the same masks in both passes) and the buffers restored
  afterwards (BatchNorm statistics see each batch once).
- μ̃ is one pass over the rank's current shard (a fresh loader over the training DataLoader's dataset and batch
  sampler), the gradients weighted by batch size, then one all-reduce of d + 1 numbers (the gradient sum and the
  sample count) and a division: the exact mean over every rank's samples.

Compute: about 2x forward/backward per step, plus one forward/backward pass over the shard per epoch; with the default
epoch length (one pass), about 3x the gradient evaluations of data-parallel SGD per pass over the data. Memory: three
more copies of the trainable parameters (the snapshot x̃ = y_s, the last epoch's output x̃_s, μ̃) and one per-step
gradient. Communication per step: 4·d
bytes (float32); per epoch another 4·(d + 1).

Restrictions, each refused with a ``ValueError`` when training starts: one ``torch.optim.SGD`` (η is its ``lr``,
read per param group, so schedulers work; ``weight_decay`` is part of f) without momentum, Nesterov or ``maximize``;
automatic optimization; no gradient accumulation (use a larger batch); no fp16 GradScaler; one training DataLoader;
trainable parameters of one dtype. Gradient clipping, if set, clips the averaged variance-reduced gradient.
Checkpoints hold x̃, x̃_s, μ̃ and the step count (the replicas are identical, so rank 0's file is complete):
a resume continues the same trajectory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.data import DataLoader
from typing_extensions import override

from ..core.collectives import payload_bytes
from ..core.rules import katyusha_momentum
from ..optim import check_epoch_length, check_tau
from .dataparallel import DataParallelStrategy
from .metrics import log_rank_local
from .recalibration import buffers_kept, fresh_training_loader, logging_muted

STATE_KEY = "katyusha_x"


class KatyushaXStrategy(DataParallelStrategy):
    """Katyusha X: variance-reduced data-parallel SGD with a full-gradient snapshot and a momentum line per epoch.

    Args:
        tau: τ in (0, 1/2], the momentum of the line between epochs; 1/2 is plain SVRG, smaller is more momentum.
            The paper's analysis sets τ = √(m η σ)/2 for a σ-strongly convex average
            (:func:`lsgd_lightning.optim.theory_tau`).
        epoch_length: m, optimizer steps per epoch; default (``None``): the Trainer's batches per epoch, one pass
            over the rank's shard.
        **ddp_kwargs: arguments of Lightning's ``DDPStrategy`` (``start_method``, ``timeout``, ...) except a
            communication hook.

    Registered as ``"katyusha_x"`` (subprocess launcher) and ``"katyusha_x_spawn"`` (spawn launcher).
    """

    strategy_name = "katyusha_x"

    def __init__(self, tau: float = 0.25, epoch_length: int | None = None, **ddp_kwargs: Any) -> None:
        super().__init__(**ddp_kwargs)
        self.tau = check_tau(tau)
        self.epoch_length = None if epoch_length is None else check_epoch_length(epoch_length)
        self.steps = 0
        self._m = 0
        self._params: list[Tensor] = []
        self._snapshot: list[Tensor] = []  # x̃ = y_s, where the current epoch started
        self._previous_output: list[Tensor] = []  # x̃_s, the weights the previous epoch ended with
        self._full_gradient: list[Tensor] = []  # μ̃ = ∇f(x̃)
        self._correction: list[Tensor] | None = None  # μ̃ − ∇f_B(x̃) for this step's batch
        self._resumed_state: Mapping[str, Any] | None = None

    # ------------------------------------------------------------------------------------------------------------
    # Checks and state
    # ------------------------------------------------------------------------------------------------------------
    def _check_setup(self, trainer: pl.Trainer) -> None:
        optimizers = trainer.optimizers
        if len(optimizers) != 1 or type(optimizers[0]) is not torch.optim.SGD:
            names = ", ".join(type(o).__name__ for o in optimizers) or "none"
            raise ValueError(
                f"Katyusha X supports exactly one torch.optim.SGD (its lr is the step size eta); got {names}."
            )
        for index, group in enumerate(optimizers[0].param_groups):
            for name, allowed in (("momentum", 0), ("nesterov", False), ("maximize", False)):
                if group.get(name, allowed) != allowed:
                    raise ValueError(
                        f"Katyusha X does not support SGD {name}={group[name]!r} (param group {index}): its inner "
                        f"step is plain x <- x - lr * g (the momentum is the line between epochs); use {name}="
                        f"{allowed!r}."
                    )
        if not self.lightning_module.automatic_optimization:
            raise ValueError("Katyusha X needs automatic optimization (automatic_optimization=True).")
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"Katyusha X does not support accumulate_grad_batches={trainer.accumulate_grad_batches}: the "
                "variance-reduced gradient is formed per optimizer step; use a larger batch size instead."
            )
        if getattr(self.precision_plugin, "scaler", None) is not None:
            raise ValueError("Katyusha X does not support precision='16-mixed' with a GradScaler; use bf16 or 32.")
        self._params = [p for g in optimizers[0].param_groups for p in g["params"] if p.requires_grad]
        if len({p.dtype for p in self._params}) > 1:
            raise ValueError("Katyusha X needs trainable parameters of one dtype (one all-reduce for the snapshot).")
        self._training_loader(trainer)
        batches = trainer.num_training_batches
        if self.epoch_length is None and batches == float("inf"):
            raise ValueError("Katyusha X: the training data has no length; set epoch_length=... (optimizer steps).")
        self._m = self.epoch_length or int(batches)

    def _state_dict(self) -> dict[str, Any]:
        def cpu(tensors: list[Tensor]) -> list[Tensor]:
            return [t.detach().cpu().clone() for t in tensors]

        return {
            "steps": self.steps,
            "snapshot": cpu(self._snapshot),
            "previous_output": cpu(self._previous_output),
            "full_gradient": cpu(self._full_gradient),
        }

    def _load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("snapshot", "previous_output", "full_gradient"):
            saved = list(state[key])
            if len(saved) != len(self._params) or any(s.shape != p.shape for s, p in zip(saved, self._params)):
                raise RuntimeError(f"The checkpoint's Katyusha X {key} does not match this model's parameters.")
            setattr(self, f"_{key}", [s.to(device=p.device, dtype=p.dtype) for s, p in zip(saved, self._params)])
        self.steps = int(state["steps"])

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        checkpoint[STATE_KEY] = self._state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only)
        self._resumed_state = checkpoint.get(STATE_KEY)  # applied in on_train_start, once the optimizer exists
        return checkpoint

    @override
    def on_train_start(self) -> None:
        self._check_setup(self.lightning_module.trainer)  # every rank raises alike, before any collective
        super().on_train_start()
        if self._resumed_state is not None:
            self._load_state_dict(self._resumed_state)
            self._resumed_state = None

    # ------------------------------------------------------------------------------------------------------------
    # The step
    # ------------------------------------------------------------------------------------------------------------
    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        if self.steps % self._m == 0:
            self._begin_epoch()
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        self.steps += 1
        self._correction = None
        return output

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        # ∇f_B(x̃) on this batch first: the forward at x must be the last one (its graph is what Lightning backprops).
        at_snapshot = self._gradients(args, kwargs, weights=self._snapshot)
        self._correction = [mu - g for mu, g in zip(self._full_gradient, at_snapshot)]
        return super().training_step(*args, **kwargs)

    @override
    def pre_backward(self, closure_loss: Tensor) -> None:
        super().pre_backward(closure_loss)
        if self._correction is not None:  # the backward pass adds ∇f_B(x); DDP then all-reduces the sum
            for param, correction in zip(self._params, self._correction):
                param.grad = correction.clone()

    @torch.no_grad()
    def _begin_epoch(self) -> None:
        epoch = self.steps // self._m
        if epoch == 0 or not self._snapshot:  # y_0 = x̃_0 = x_0
            self._previous_output = [p.detach().clone() for p in self._params]
        else:  # x̃_s = x; x <- y_s
            outputs = [p.detach().clone() for p in self._params]
            for param, output, snapshot, previous in zip(self._params, outputs, self._snapshot, self._previous_output):
                param.copy_(katyusha_momentum(output, snapshot, previous, self.tau))
            self._previous_output = outputs
        self._snapshot = [p.detach().clone() for p in self._params]
        self._full_gradient = self._full_pass()
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in self._full_gradient]))
        metrics = {"katyusha_x/epoch": float(epoch), "katyusha_x/full_grad_norm": float(norm)}
        log_rank_local(self.lightning_module, metrics)

    def _full_pass(self) -> list[Tensor]:
        """μ̃ = (1/n) Σ_i ∇f_i(x̃) over every rank's samples: one pass over this rank's shard, one all-reduce."""
        loader = self._training_loader(self.lightning_module.trainer)
        sums = [torch.zeros_like(p) for p in self._params]
        count = 0
        for batch_idx, batch in enumerate(loader):
            batch = self.batch_to_device(batch)
            size = extract_batch_size(batch)
            for total, grad in zip(sums, self._gradients((batch, batch_idx), {})):
                total.add_(grad, alpha=size)
            count += size
        number = torch.tensor([float(count)], dtype=sums[0].dtype if sums else None, device=self.root_device)
        flat = torch.cat([*(s.reshape(-1) for s in sums), number])  # the count rides along: exact for any shards
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.comm.count(payload_bytes(flat))
            with self.comm.timed(self.root_device):
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if float(flat[-1]) == 0:
            raise ValueError("Katyusha X: the training data is empty, so the snapshot has no full gradient.")
        flat = flat[:-1] / flat[-1]
        return [part.view_as(p).clone() for part, p in zip(flat.split([p.numel() for p in self._params]), self._params)]

    def _gradients(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], weights: list[Tensor] | None = None
    ) -> list[Tensor]:
        """∇ of the user's ``training_step`` loss w.r.t. the trainable parameters, at ``weights`` (default: current).

        Side-effect free for the training: no logging, buffers and RNG state as before, parameters restored.
        """
        module = self.lightning_module
        devices = [self.root_device.index or 0] if self.root_device.type == "cuda" else []
        with (
            _parameters_set_to(self._params, weights),
            buffers_kept(module),
            logging_muted(module),
            torch.random.fork_rng(devices=devices),
            torch.enable_grad(),
            self.precision_plugin.train_step_context(),
        ):
            output = module.training_step(*args, **kwargs)
            loss = output["loss"] if isinstance(output, Mapping) else output
            if not isinstance(loss, Tensor):
                raise ValueError("Katyusha X needs training_step to return the loss (a tensor or {'loss': tensor}).")
            grads = torch.autograd.grad(loss, self._params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, self._params)]

    def _training_loader(self, trainer: pl.Trainer) -> DataLoader:
        """A fresh loader over the training DataLoader's dataset and (sharded) batch sampler, for the snapshot pass.

        Fresh, so the fit loop's own iterator (persistent workers included) is never reset.
        """
        loader = fresh_training_loader(trainer, "Katyusha X")
        if loader is None:
            raise ValueError("Katyusha X needs one training DataLoader (it reads its shard); got None.")
        return loader


@contextmanager
def _parameters_set_to(params: list[Tensor], weights: list[Tensor] | None) -> Iterator[None]:
    if weights is None:
        yield
        return
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for param, value in zip(params, weights):
            param.copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for param, value in zip(params, saved):
                param.copy_(value)
