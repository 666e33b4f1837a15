"""D², decentralized training over decentralized data (Tang et al., ICML 2018, arXiv:1803.07068).

D-PSGD slows down when the workers' data differ (each worker's gradient pulls toward its own optimum). D² removes
that bias with a correction term from the previous step. With X the stacked replicas, G the stacked stochastic
gradients and W a fixed symmetric doubly stochastic mixing matrix::

    X_1     = W (X_0 - lr G_0)                                         (the first step: gossip the SGD step)
    X_{t+1} = W (2 X_t - X_{t-1} - lr G_t + lr G_{t-1})                 (t >= 1)

Written with the local SGD step y_t = X_t - lr G_t (what the optimizer produces from X_t), the bracket is
``y_t + X_t - y_{t-1}``, so each worker only keeps y_{t-1}, its previous post-step weights (one copy of the model,
saved in checkpoint shards). With W = I this reduces to plain SGD, also under a learning-rate schedule, because
the correction uses the previous step's own ``lr_{t-1} G_{t-1}``.

What is communicated and when: after every optimizer step each worker sends the bracket (d floats) to its
neighbours, point to point, and receives theirs, exactly like D-PSGD (2 · 4d bytes per step on a ring).

The condition on W: D² converges only if W's smallest eigenvalue is above -1/3 (Tang et al., Assumption 1). The
plain ring with weights 1/3 has smallest eigenvalue exactly -1/3 on an even number of workers, so the default is
the *lazy* ring (W + I) / 2 (weights 2/3 self, 1/6 per neighbour; eigenvalues >= 1/3). W must be fixed (the
time-varying ``"exponential"`` topology is refused) and symmetric. Violations raise ``ValueError`` before training.

Optimizers: ``torch.optim.SGD`` without momentum (``momentum=0``), one optimizer. ``weight_decay`` is allowed and
is part of G (the gradient of the L2-regularized loss). Momentum and Nesterov are refused with a ``ValueError``:
the correction ``lr (G_t - G_{t-1})`` cancels the previous stochastic gradient only when a step is exactly
``lr * gradient``; with momentum the step mixes all past gradients. Use D-PSGD for local momentum.

Floating-point buffers (e.g. BatchNorm statistics) are only averaged with W (no correction); integer buffers stay
local. Evaluation, the checkpoint's main file and ``final_sync`` use the workers' average.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from ..core.flat import to_master
from ..core.gossip import Mixing, gossip, smallest_eigenvalue
from ..core.rules import d2_bracket, squared_distance
from .checkpoints import restored_flats, saved_flats
from .checks import refuse_sgd_setting, single_sgd
from .every_step import EveryStepStrategy

EIGENVALUE_BOUND = -1.0 / 3.0


class D2Strategy(EveryStepStrategy):
    """D²: decentralized SGD with a correction for workers whose data differ (fixed W, eigenvalues > -1/3).

    Args:
        topology: ``"ring"`` (default) or a P x P symmetric doubly stochastic mixing matrix (nested lists).
        lazy: use (W + I) / 2; on by default, which makes any symmetric doubly stochastic W satisfy the condition.
        **kwargs: :class:`~.base.ReplicaStrategy`'s ``eval_on`` (evaluate the workers' average, or ``"local"``),
            ``final_sync``, ``bucket_cap_mb``, ``timeout``, ``start_method`` and Lightning's process arguments.

    Registered as ``"d2"`` (subprocess launcher) and ``"d2_spawn"`` (spawn launcher).
    """

    strategy_name: ClassVar[str] = "d2"
    point_to_point: ClassVar[bool] = True
    algorithm: ClassVar[str] = "D²"

    def __init__(
        self,
        topology: str | Sequence[Sequence[float]] = "ring",
        lazy: bool = True,
        **kwargs: Any,
    ) -> None:
        if topology == "exponential":
            raise ValueError(
                "D² needs a fixed mixing matrix, but topology='exponential' changes W every step. Use 'ring' "
                "(lazy by default) or a fixed symmetric matrix."
            )
        super().__init__(**kwargs)
        self.mixing = Mixing(topology, lazy)
        self._previous_half_step: list[Tensor] = []  # y_{t-1} per floating bucket (parameter elements used)

    @override
    def _check_world_size(self, world_size: int) -> None:
        topology = self.mixing.build(world_size)
        matrix = topology.static_matrix
        assert matrix is not None
        if not torch.allclose(matrix, matrix.T, atol=1e-9):
            raise ValueError("D² needs a symmetric mixing matrix (W = W^T); the given matrix is not symmetric.")
        smallest = smallest_eigenvalue(matrix)
        if smallest <= EIGENVALUE_BOUND + 1e-9:
            raise ValueError(
                f"D² needs the mixing matrix's smallest eigenvalue above -1/3, but the {topology.name} "
                f"topology with {world_size} workers has {smallest:.6f}. Use lazy=True (W + I) / 2, whose "
                "eigenvalues are all >= 0."
            )

    @override
    def _check_optimizers(self, optimizers: Sequence[Optimizer]) -> None:
        optimizer = single_sgd(self.algorithm, optimizers)
        why = (
            "D²'s correction lr * (G_t - G_{t-1}) needs steps of exactly lr * gradient. Use momentum=0 "
            "(weight_decay is fine), or strategy='dpsgd', which supports local momentum."
        )
        refuse_sgd_setting(self.algorithm, optimizer, "momentum", lambda v: v == 0, why)
        refuse_sgd_setting(self.algorithm, optimizer, "nesterov", lambda v: not v, why)

    @override
    def _on_fresh_start(self) -> None:
        # y_{-1} := X_0 makes the first bracket y_0 + X_0 - y_{-1} = y_0: X_1 = W (X_0 - lr G_0).
        self._previous_half_step = self.layout.masters()

    @override
    def _extra_state_dict(self) -> dict[str, Any]:
        return {"previous_half_step": saved_flats(self._previous_half_step)}

    @override
    def _load_extra_state_dict(self, state: Mapping[str, Any]) -> None:
        saved, buckets = state.get("previous_half_step"), self.layout.floating_buckets
        self._previous_half_step = restored_flats(saved, buckets, "D² state (previous iterate)")

    @override
    def _exchange(self) -> dict[str, float]:
        """X_{t+1} = W (y_t + X_t - y_{t-1}) for parameters, W b for floating-point buffers."""
        plan = self.mixing.plan(self.global_rank, self.steps)
        squared = torch.zeros((), dtype=torch.float64, device=self.root_device)
        views = self._step_views()
        for index, (bucket, mask, previous, (before, now, _)) in enumerate(
            zip(self.layout.floating_buckets, self._parameter_masks, self._previous_half_step, views)
        ):
            now, before = to_master(now), to_master(before)  # the bracket travels in float32 for a half model
            bracket = d2_bracket(after=now, before=before, previous_after=previous, is_parameter=mask)
            previous.copy_(now)
            mixed = gossip(plan, bracket, self.comm, self.root_device, tag=index)
            squared += squared_distance(mixed, bracket)
            bucket.unpack(mixed)
        return {f"{self.strategy_name}/mixing_distance": math.sqrt(float(squared))}
