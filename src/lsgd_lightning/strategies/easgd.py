"""Synchronous Elastic Averaging SGD (Zhang, Choromanska, LeCun 2015, arXiv:1412.6651) as a Lightning strategy.

Workers x_1..x_P are tied to a *center variable* c by an elastic force of strength alpha. After every ``tau``-th
optimizer step, using the values from before the round::

    x_bar <- (1/P) Σ_j x_j                                (one all-reduce of the flat parameters)
    x_i   <- x_i - alpha * (x_i - c)
    c     <- c + P * alpha * (x_bar - c)          (= c + alpha Σ_j (x_j - c))

The center starts at the (identical) initial weights and is kept on every worker: every worker applies the same
update to its copy, so the copies stay identical and the center itself is never sent. Communicated per round and
worker: one all-reduce of the floating-point parameters and buffers, 4·d bytes for float32, i.e. 4·d / tau per step.
Integer buffers stay local. The elastic term is applied outside the optimizer, so momentum never sees it.

Momentum (``momentum_rule``). ``"optimizer"`` (default, the behaviour of earlier versions): the optimizer steps as
it is. torch's Nesterov SGD stores Sutskever's reparametrization: the weights it holds are the look-ahead point
y = x + δv, so the elastic force acts on x + δv (and the next gradient is taken at the moved look-ahead). That is a
variant of the package, not the paper's EAMSGD. ``"eamsgd"``: EAMSGD as the paper defines it (Sec. 3.2, eq. 7; the
asynchronous form, Algorithm 2, as the authors' code ``sixin-zh/mpiT``, ``BiCNN/optim-eamsgd.lua``, runs it: the
elastic difference taken from the weights before the local step, applied after it)::

    v_{t+1} = δ v_t - η g_t(x_t + δ v_t)
    x_{t+1} = x_t + v_{t+1} - α (x_t - c_t)          (the force on x_t; v never sees it; δ = 0 gives EASGD, eq. 5)

The strategy owns x and v (per floating-point bucket, float32 for a half model) and the model holds the look-ahead
y = x + δv, where the next gradient is taken, so manual optimization and gradient accumulation compute their
gradients at the right point. One ``torch.optim.SGD`` supplies η (``lr``), δ (``momentum``, with ``nesterov=True``:
EAMSGD is Nesterov's scheme; ``momentum=0`` is plain EASGD) and λ (``weight_decay``, its gradient λy), read per param
group at every step; SGD's own update is skipped. The rule is :func:`~lsgd_lightning.core.rules.eamsgd_local_step`;
the round is :func:`~lsgd_lightning.core.rules.elastic_round` on x, after which x takes the force at once and y at the
next step. So the gradient of step t+1 is taken at the weights from before round t's force, as in eq. 7.

Stability: the worker update contracts toward the center only for 0 < alpha < 1, and the center moves a fraction
P·alpha of the way to the workers' mean, which must not overshoot it: 0 < P·alpha <= 1. Both are enforced
(the paper's choice alpha = beta / P with beta = 0.9 satisfies them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from ..core.rules import eamsgd_local_step, elastic_alpha, elastic_round, squared_distance
from .checkpoints import restored_flats, saved_flats
from .checks import check_choice, check_eamsgd_optimizer, check_elastic_rates
from .periodic import PeriodicStrategy
from .stepping import replaced_step

MOMENTUM_RULES = ("optimizer", "eamsgd")


class ElasticStrategy(PeriodicStrategy):
    """What both EASGD forms share: the momentum rule (see the module docstring).

    With ``momentum_rule="eamsgd"`` a round moves x (:meth:`_elastic_own` gives the round x, :meth:`_take_elastic`
    applies its result); with ``"optimizer"`` both act on the model's weights.
    """

    def __init__(self, *args: Any, momentum_rule: str = "optimizer", **kwargs: Any) -> None:
        check_choice("momentum_rule", momentum_rule, MOMENTUM_RULES)
        super().__init__(*args, **kwargs)
        self.momentum_rule = momentum_rule
        self._x: list[Tensor] = []  # EAMSGD: the paper's x, one flat tensor per floating bucket; the model holds y
        self._v: list[Tensor] = []  # EAMSGD: the velocity v, the same shape (0 at buffers)
        self._is_parameter: list[Tensor] = []
        self._views: dict[int, tuple[Tensor, Tensor]] = {}  # id(parameter) -> its (x, v) views

    @property
    def eamsgd(self) -> bool:
        return self.momentum_rule == "eamsgd"

    @override
    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        super().setup_optimizers(trainer)
        if self.eamsgd and trainer.state.fn == TrainerFn.FITTING:
            check_eamsgd_optimizer(type(self).__name__, self.optimizers)

    # ------------------------------------------------------------------------------------------------ state
    def _start_momentum(self, x: list[Tensor] | None = None, v: list[Tensor] | None = None) -> None:
        """x from the model (or ``x``), v = 0 (or ``v``); the model keeps its weights as y."""
        assert self.lightning_module is not None
        self._is_parameter = self.layout.parameter_masks(self.lightning_module)
        self._x = x if x is not None else self.layout.masters()
        self._v = v if v is not None else [torch.zeros_like(flat) for flat in self._x]
        self._views = {
            id(tensor): (x_part, v_part)
            for bucket, x_flat, v_flat in zip(self.layout.floating_buckets, self._x, self._v)
            for tensor, x_part, v_part in zip(bucket.tensors, bucket.split(x_flat), bucket.split(v_flat))
        }
        missing = [p for o in self.optimizers for g in o.param_groups for p in g["params"] if id(p) not in self._views]
        if missing:
            raise ValueError(
                f"{type(self).__name__} with momentum_rule='eamsgd' steps the LightningModule's own parameters only; "
                f"the optimizer holds {len(missing)} other tensor(s)."
            )

    @override
    def _on_fresh_start(self) -> None:
        super()._on_fresh_start()
        if self.eamsgd:
            self._start_momentum()

    @override
    def _extra_state_dict(self) -> dict[str, Any]:
        state = super()._extra_state_dict()
        if self.eamsgd:
            state["eamsgd"] = {"x": saved_flats(self._x), "velocity": saved_flats(self._v)}
        return state

    @override
    def _load_extra_state_dict(self, state: Mapping[str, Any]) -> None:
        super()._load_extra_state_dict(state)
        if self.eamsgd:
            saved = state.get("eamsgd") or {}
            buckets = self.layout.floating_buckets
            x = restored_flats(saved.get("x"), buckets, "EAMSGD state (written with momentum_rule='optimizer'?)")
            self._start_momentum(x, restored_flats(saved.get("velocity"), buckets, "EAMSGD velocity"))

    @override
    def _reset_to(self, flats: list[Tensor], reference: str) -> None:
        super()._reset_to(flats, reference)
        if self.eamsgd:
            self._start_momentum()  # x = the reference's weights, v = 0

    # ------------------------------------------------------------------------------------------------ the step
    @override
    def _local_step(self, optimizer: Optimizer) -> AbstractContextManager[None]:
        if not self.eamsgd:
            return super()._local_step(optimizer)
        # Lightning runs optimizer.step(closure) (forward and backward at y, clipping, hooks); EAMSGD's step replaces
        # SGD's own update
        return replaced_step(optimizer, lambda: self._momentum_step(optimizer))

    @torch.no_grad()
    def _momentum_step(self, optimizer: Optimizer) -> None:
        for group in optimizer.param_groups:
            lr, delta, decay = float(group["lr"]), float(group["momentum"]), float(group["weight_decay"])
            for param in group["params"]:
                if param.grad is None:  # like torch's SGD: a parameter without a gradient does not move
                    continue
                x, v = self._views[id(param)]
                moved = eamsgd_local_step(x, v, param.to(x.dtype), param.grad.to(x.dtype), lr, delta, decay)
                torch._foreach_copy_([x, v, param], list(moved))

    # ------------------------------------------------------------------------------------------------ the round
    def _elastic_own(self, masters: list[Tensor]) -> list[Tensor]:
        """What the round moves: the model's weights, or with EAMSGD x (parameters) and the model's buffers."""
        if not self.eamsgd:
            return masters
        return [torch.where(mask, x, own) for mask, x, own in zip(self._is_parameter, self._x, masters)]

    def _take_elastic(self, moved: list[Tensor]) -> None:
        """Write a round's result: the model's weights, or with EAMSGD x and the model's buffers (y moves with x at
        the next step)."""
        for index, (bucket, new) in enumerate(zip(self.layout.floating_buckets, moved)):
            if not self.eamsgd:
                bucket.unpack(new)
                continue
            self._x[index].copy_(new)
            bucket.unpack(torch.where(self._is_parameter[index], bucket.pack().to(new.dtype), new))


class EASGDStrategy(ElasticStrategy):
    """Synchronous EASGD: every ``tau`` steps, workers and a shared center variable attract each other.

    Args:
        tau: optimizer steps between rounds (>= 1).
        beta: total elastic strength; ``alpha = beta / world_size`` unless ``moving_rate`` is given. In (0, 1].
        moving_rate: alpha itself (overrides ``beta``); requires 0 < alpha < 1 and world_size * alpha <= 1.
        momentum_rule: ``"optimizer"`` (the optimizer's own step; with Nesterov SGD the force acts on x + δv) or
            ``"eamsgd"`` (the paper's EAMSGD, eq. 7: the strategy steps SGD's Nesterov momentum, force on x).
        **kwargs: :class:`~.base.ReplicaStrategy`'s ``eval_on`` (evaluate the center, or ``"local"``),
            ``final_sync``, ``bucket_cap_mb``, ``timeout``, ``start_method`` and Lightning's process arguments.

    Registered as ``"easgd"`` (subprocess launcher) and ``"easgd_spawn"`` (spawn launcher).
    """

    strategy_name: ClassVar[str] = "easgd"
    reference_name: ClassVar[str] = "center"

    def __init__(self, tau: int = 16, beta: float = 0.9, moving_rate: float | None = None, **kwargs: Any) -> None:
        self.beta, self.moving_rate = check_elastic_rates(beta, moving_rate)
        super().__init__(tau=tau, **kwargs)
        self._center: list[Tensor] = []  # one flat tensor per floating-point bucket of the layout

    def alpha_for(self, world_size: int) -> float:
        return elastic_alpha(self.beta, self.moving_rate, world_size)

    @property
    def alpha(self) -> float:
        return self.alpha_for(self.world_size)

    @override
    def _check_world_size(self, world_size: int) -> None:
        alpha = self.alpha_for(world_size)
        if not (0.0 < alpha < 1.0 and world_size * alpha <= 1.0):
            raise ValueError(
                f"EASGD needs 0 < alpha < 1 and 0 < world_size * alpha <= 1 (the center must not overshoot the "
                f"workers' mean); moving_rate={self.moving_rate}, beta={self.beta} give alpha={alpha:g} with "
                f"world_size={world_size} (world_size * alpha = {world_size * alpha:g}). Lower moving_rate, or "
                "leave it None to use beta / world_size."
            )

    @override
    def _on_fresh_start(self) -> None:
        self._center = self.layout.masters()  # float32 for a half-precision model: small moves accumulate
        super()._on_fresh_start()

    @override
    def _extra_state_dict(self) -> dict[str, Any]:
        return {"center": saved_flats(self._center), **super()._extra_state_dict()}

    @override
    def _load_extra_state_dict(self, state: Mapping[str, Any]) -> None:
        self._center = restored_flats(state.get("center"), self.layout.floating_buckets, "EASGD center")
        super()._load_extra_state_dict(state)

    @override
    def _communication_round(self) -> dict[str, float]:
        alpha = self.alpha
        diverged = self.is_diverged()
        owns = self._elastic_own(self.layout.masters())  # the sum travels in float32 for a half-precision model
        # A diverged worker sends NaN, so the sums reveal a divergence without any extra bytes in a healthy round.
        sums = [self._sum_over_workers(own, poisoned=diverged) for own in owns]
        healthy = self.world_size
        if not all(bool(torch.isfinite(total).all()) for total in sums):
            # Rare path: learn who diverged and average over the healthy workers only.
            flags = self.collectives.all_gather(torch.tensor([float(diverged)], device=self.root_device))
            healthy = self.world_size - int(flags.sum())
            if healthy == 0:
                self._raise_all_diverged()
            sums = [self._sum_over_workers(own, poisoned=False, excluded=diverged) for own in owns]
        squared = torch.zeros((), dtype=torch.float64, device=self.root_device)
        moved = []
        for index, (own, total) in enumerate(zip(owns, sums)):
            if not diverged:
                squared += squared_distance(own, self._center[index])
            new, self._center[index] = elastic_round(own, self._center[index], total, healthy, alpha)
            moved.append(new)
        if diverged:
            self._reset_to(self._reference_weights(), "center")
            return {}
        self._take_elastic(moved)
        return {"easgd/dist_to_center": math.sqrt(float(squared))}

    def _sum_over_workers(self, own: Tensor, poisoned: bool, excluded: bool = False) -> Tensor:
        if poisoned:
            contribution = torch.full_like(own, math.nan)
        elif excluded:
            contribution = torch.zeros_like(own)
        else:
            contribution = own.clone()
        return self.collectives.all_reduce_sum(contribution)

    @override
    def _reference_weights(self) -> list[Tensor]:
        # Floating buckets: the center (identical everywhere, nothing to send); integer buckets: the rank's own.
        center = iter(self._center)
        return [next(center).to(bucket.dtype) if bucket.floating else bucket.pack() for bucket in self.layout.buckets]
