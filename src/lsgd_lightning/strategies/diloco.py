"""DiLoCo (Douillard et al. 2023, arXiv:2311.08105, Algorithm 1) as a Lightning strategy.

All workers start from rank 0's weights θ. Each worker i trains its replica θ_i with its own (inner) optimizer on its
own data shard and keeps that optimizer's state throughout. After every ``tau``-th optimizer step (H in the paper)::

    Δ = (1/P) Σ_i (θ - θ_i)                  (one all-reduce of the floating-point state: core.rules.pseudo_gradient)
    θ ← OuterOpt(θ, Δ)                      (Δ is the gradient; default SGD, lr 0.7, Nesterov momentum 0.9)
    θ_i ← θ                                  on every worker

θ is kept on every worker as float32 flat tensors (:class:`~lsgd_lightning.core.outer.OuterModel`), identical
everywhere since every worker applies the same outer step to the same all-reduced Δ: only the pseudo-gradients travel,
4·d' bytes per round and worker for d' float32 values (parameters plus floating buffers), i.e. 4·d'/tau per step.
Floating buffers (BatchNorm statistics) are not optimized: θ takes the workers' average of them (Δ on them is 0 for
the outer optimizer); integer buffers stay each worker's own. Evaluation, the main checkpoint file and the final sync
use θ (evaluation costs no communication). Steps after the last round are not in θ, so the final sync drops them:
end training on a multiple of ``tau`` to keep them.

The outer optimizer is any ``torch.optim`` optimizer: ``outer_optimizer`` is a callable ``params -> Optimizer`` (e.g.
``functools.partial(torch.optim.Adam, lr=1e-3)``, or Hydra's ``_partial_: true``); without it ``torch.optim.SGD(lr=
outer_lr, momentum=outer_momentum, nesterov=nesterov)``. Its state and θ are in every checkpoint shard (exact resume).

A diverged worker (non-finite loss or weights) sends NaN, which shows in the all-reduced sum without extra bytes in a
healthy round; the round then learns who diverged (P floats), averages over the healthy workers only, and resets the
diverged ones to the new θ with fresh inner optimizer state, as EASGD does.

Fidelity: the paper's inner optimizer is AdamW; here it is whatever ``configure_optimizers`` returns (its state is
kept across rounds, as in the paper). The paper's model has no BatchNorm; averaging floating buffers is this package's
choice, the same as for EASGD's center.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor
from typing_extensions import override

from ..core.outer import OuterFactory, OuterModel
from ..core.rules import pseudo_gradient, squared_distance
from .checks import check_outer_options
from .periodic import PeriodicStrategy


class DiLoCoStrategy(PeriodicStrategy):
    """DiLoCo: local training; every ``tau`` steps an outer optimizer steps the global model θ with the workers'
    averaged pseudo-gradient, and every worker takes θ.

    Args:
        tau: inner optimizer steps between outer rounds (H in the paper; >= 1).
        outer_lr: the default outer SGD's learning rate (> 0).
        outer_momentum: its momentum, in [0, 1).
        nesterov: Nesterov momentum (needs ``outer_momentum > 0``).
        outer_optimizer: a callable building the outer optimizer from a list of parameters (θ's flat buffers);
            replaces the default SGD (then ``outer_lr``, ``outer_momentum``, ``nesterov`` must keep their defaults).
        **kwargs: :class:`~.base.ReplicaStrategy`'s ``eval_on`` (``"global"``: θ, or ``"local"``), ``final_sync``,
            ``loss_window``, ``bucket_cap_mb``, ``timeout``, ``start_method`` and Lightning's process arguments.

    Raises ``ValueError`` for a bad or conflicting setting. Registered as ``"diloco"`` and ``"diloco_spawn"``.
    """

    strategy_name: ClassVar[str] = "diloco"
    reference_name: ClassVar[str] = "global"

    def __init__(
        self,
        tau: int = 500,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        nesterov: bool = True,
        outer_optimizer: OuterFactory | None = None,
        **kwargs: Any,
    ) -> None:
        self._outer_factory = check_outer_options(outer_optimizer, outer_lr, outer_momentum, nesterov)
        super().__init__(tau=tau, **kwargs)
        self.outer_lr, self.outer_momentum, self.nesterov = outer_lr, outer_momentum, nesterov
        self.outer_optimizer = outer_optimizer
        self._outers: list[OuterModel] = []  # DiLoCo: one over the floating buckets; Streaming: one per fragment

    @property
    def outer_models(self) -> list[OuterModel]:
        """θ and its outer optimizer (one per fragment for Streaming DiLoCo); empty before training."""
        return self._outers

    def _new_outers(self) -> list[OuterModel]:
        """θ from the current weights (the identical start) with a fresh outer optimizer."""
        assert self.lightning_module is not None
        masks = self.layout.parameter_masks(self.lightning_module)
        return [OuterModel(self.layout.masters(), masks, self._outer_factory)]

    @override
    def _on_fresh_start(self) -> None:
        self._outers = self._new_outers()

    @override
    def _extra_state_dict(self) -> dict[str, Any]:
        return {"outers": [outer.state_dict() for outer in self._outers]}

    @override
    def _load_extra_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = list(state.get("outers") or [])
        self._outers = self._new_outers()
        if len(saved) != len(self._outers):
            raise RuntimeError(f"The checkpoint's {self.strategy_name} global model does not match this model.")
        for outer, outer_state in zip(self._outers, saved):
            outer.load_state_dict(outer_state, f"{self.strategy_name} global model")

    # ------------------------------------------------------------------------------------------------ the round
    @override
    def _communication_round(self) -> dict[str, float]:
        outer = self._outers[0]
        diverged = self.is_diverged()
        owns = self.layout.masters()
        thetas = outer.flats
        differences = [pseudo_gradient(theta, own) for theta, own in zip(thetas, owns)]
        sums, healthy = self._sum_over_healthy(differences, diverged)
        deltas = [total / healthy for total in sums]
        squared = torch.zeros((), dtype=torch.float64, device=self.root_device)
        for own, theta in zip(owns, thetas):
            squared += squared_distance(own, theta)
        outer_norm = math.sqrt(sum(float(delta.double().square().sum()) for delta in deltas))
        outer.step(deltas)
        if diverged:
            self._reset_to(self._reference_weights(), "global model")
            return {}
        for bucket, theta in zip(self.layout.floating_buckets, outer.flats):
            bucket.unpack(theta)
        return {"diloco/outer_grad_norm": outer_norm, "diloco/dist_to_global": math.sqrt(float(squared))}

    @override
    def _reference_weights(self) -> list[Tensor]:
        # Floating buckets: θ (identical everywhere, nothing to send); integer buckets: the rank's own.
        theta = iter(self._outers[0].flats)
        return [next(theta).to(bucket.dtype) if bucket.floating else bucket.pack() for bucket in self.layout.buckets]
