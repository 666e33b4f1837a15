"""signSGD / Signum with majority vote (Bernstein et al., ICML 2018 arXiv:1802.04434; ICLR 2019 arXiv:1810.05291).

Each worker i keeps a momentum m_i of its own stochastic gradients and sends only its sign, one bit per coordinate;
the update is the majority vote, the same on every worker::

    m_i  <- beta * m_i + (1 - beta) * g_i             (m_i = 0 at the start; beta = 0 is signSGD: m_i = g_i)
    vote <- sign(sum_j sign(m_j))                      (per coordinate; 0 on a tie, possible with an even P)
    x    <- x - lr * (vote + weight_decay * x)          (on every worker: the replicas stay identical)

Weight decay is applied as in the authors' code for the majority-vote runs: not folded into the gradient before
the sign, but added to the voted direction, decoupled (``x -= lr * weight_decay * x``) and local.

What is communicated and when: after every optimizer step, each worker packs sign(m_i) into int32 words, 32 signs
a word (bit k of word w is coordinate 32w + k, 1 for ``>= 0``; a momentum of exactly 0 is sent as +1, because one
bit cannot say 0), and all-gathers the words; every worker counts the votes itself, so no worker plays server and
no vote is sent back. ``comm/bytes`` counts the words this worker sends, 4 * ceil(d / 32) ≈ d / 8 bytes per step
for d parameters, against 4·d for an all-reduce of float32 gradients (it receives P times that). One all-gather per
``bucket_cap_mb`` of float32 coordinates.

Optimizers: one ``torch.optim.SGD``, used for its hyperparameters, read per param group at every step (so
learning-rate schedulers work): ``lr``, ``momentum`` (beta, in [0, 1)) and ``weight_decay``. SGD's own update is not
applied: Lightning still runs the closure (forward, backward, gradient clipping, hooks) through ``optimizer.step``,
then this strategy applies the voted update. ``nesterov=True``, ``dampening != 0`` and ``maximize=True`` are
refused, as are other optimizers and ``precision="16-mixed"`` with a GradScaler (a skipped fp16 step would still
vote); bf16 and 32-bit precisions work. Only parameters with ``requires_grad=True`` vote; a parameter without a
gradient in a step counts as a zero gradient (freeze parameters that never get one: a zero momentum votes +1).

The momentum lives in this strategy (saved in each rank's checkpoint shard). Parameters are bitwise identical on
all workers; floating-point buffers (e.g. BatchNorm statistics) are each worker's own. Evaluation, the
checkpoint's main file and ``final_sync`` use the parameters with the workers' averaged buffers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from ..core.collectives import all_gather_single, payload_bytes
from ..core.flat import master_dtype, to_master
from ..core.rules import signum_momentum, signum_step
from ..core.signs import majority_vote_packed, pack_signs, packed_words
from .checks import refuse_sgd_setting, single_sgd
from .every_step import EveryStepStrategy
from .stepping import replaced_step


class SignumStrategy(EveryStepStrategy):
    """Signum with majority vote: workers exchange 1-bit signs of their momentum and all step by the vote.

    Args:
        **kwargs: :class:`~.base.ReplicaStrategy`'s ``eval_on`` (``"average"``: the parameters with the workers'
            averaged buffers; or ``"local"``), ``final_sync``, ``bucket_cap_mb`` (float32 coordinates per
            all-gather: the message is 32x smaller), ``timeout``, ``start_method``, Lightning's process arguments.

    Registered as ``"signum"`` (subprocess launcher) and ``"signum_spawn"`` (spawn launcher).
    """

    strategy_name: ClassVar[str] = "signum"
    algorithm: ClassVar[str] = "Signum"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._optimizer: torch.optim.SGD | None = None
        self._momentum: list[Tensor] = []  # m_i, one flat tensor per param group (float32 for a half model)

    # ------------------------------------------------------------------------------------------------------------
    # Checks and state
    # ------------------------------------------------------------------------------------------------------------
    @override
    def _check_optimizers(self, optimizers: Sequence[Optimizer]) -> None:
        optimizer = single_sgd(self.algorithm, optimizers)
        refuse_sgd_setting(
            self.algorithm,
            optimizer,
            "momentum",
            lambda v: isinstance(v, (int, float)) and 0 <= v < 1,
            "Signum's momentum beta must be in [0, 1) (0 gives signSGD).",
        )
        why = "Signum votes on the sign of a plain exponential moving average of the gradients; use {}."
        refuse_sgd_setting(self.algorithm, optimizer, "nesterov", lambda v: not v, why.format("nesterov=False"))
        refuse_sgd_setting(self.algorithm, optimizer, "dampening", lambda v: v == 0, why.format("dampening=0"))
        refuse_sgd_setting(self.algorithm, optimizer, "maximize", lambda v: not v, "it minimizes the loss.")
        if getattr(self.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                "Signum does not support precision='16-mixed' with a GradScaler: a step the scaler skips would still "
                "vote. Signs need no loss scaling: use precision='bf16-mixed' or 32."
            )
        self._optimizer = optimizer

    def _groups(self) -> list[tuple[list[Tensor], dict[str, Any]]]:
        """Per param group, its parameters that vote (``requires_grad``) and the group's hyperparameters."""
        assert self._optimizer is not None
        groups = [([p for p in g["params"] if p.requires_grad], g) for g in self._optimizer.param_groups]
        return [(params, group) for params, group in groups if params]

    @override
    def _on_fresh_start(self) -> None:
        # One flat momentum per param group, in float32 for a half-precision model (it accumulates small moves).
        self._momentum = [
            torch.zeros(sum(p.numel() for p in params), dtype=master_dtype(params[0].dtype), device=params[0].device)
            for params, _ in self._groups()
        ]

    @override
    def _extra_state_dict(self) -> dict[str, Any]:
        # Saved per parameter (the layout a reader expects), whatever the flat buffers look like.
        return {
            "momentum": [
                part.detach().cpu().clone()
                for flat, (params, _) in zip(self._momentum, self._groups())
                for part in _split_like(flat, params)
            ]
        }

    @override
    def _load_extra_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = iter(list(state.get("momentum", [])))
        momentum = []
        try:
            for params, _ in self._groups():
                parts = [next(saved) for _ in params]
                if any(m.shape != p.shape for m, p in zip(parts, params)):
                    raise StopIteration
                flat = torch.cat([m.reshape(-1) for m in parts])
                momentum.append(flat.to(device=params[0].device, dtype=master_dtype(params[0].dtype)))
        except StopIteration:
            momentum = []
        if not momentum or next(saved, None) is not None:
            raise RuntimeError("The checkpoint's Signum momentum does not match this model's trainable parameters.")
        self._momentum = momentum

    # ------------------------------------------------------------------------------------------------------------
    # The step
    # ------------------------------------------------------------------------------------------------------------
    @override
    def _local_step(self, optimizer: Optimizer) -> AbstractContextManager[None]:
        return replaced_step(optimizer)  # Lightning runs the closure; SGD's own update is skipped

    @override
    def _after_local_step(self) -> None:
        if self.world_size == 1:
            self._exchange()  # local Signum: the vote of one
        else:
            super()._after_local_step()  # counts the round and logs its metrics

    @override
    @torch.no_grad()
    def _exchange(self) -> dict[str, float]:
        groups = self._groups()
        for momentum, (params, group) in zip(self._momentum, groups):
            grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            momentum.copy_(signum_momentum(momentum, grads, float(group["momentum"])))
        own = torch.cat(self._momentum) if self._momentum else torch.zeros(0, device=self.root_device)
        vote = self._vote(own)
        offset = 0
        for momentum, (params, group) in zip(self._momentum, groups):
            direction = vote[offset : offset + momentum.numel()]
            offset += momentum.numel()
            weights = to_master(torch.cat([p.detach().reshape(-1) for p in params]))
            stepped = signum_step(weights, direction, float(group["lr"]), float(group["weight_decay"]))
            torch._foreach_copy_(params, _split_like(stepped, params))
        numel = max(1, own.numel())
        own_sign = torch.where(own >= 0, 1, -1).to(torch.int8)
        return {
            "signum/agreement": float((own_sign == vote).sum()) / numel,
            "signum/ties": float((vote == 0).sum()) / numel,
        }

    def _vote(self, own: Tensor) -> Tensor:
        """sign(sum over workers of sign(own)), as int8; one all-gather of packed words per chunk."""
        chunk = max(32, self.bucket_cap_bytes // 4 // 32 * 32)  # coordinates per message, whole words
        votes = []
        for start in range(0, own.numel(), chunk):
            part = own[start : start + chunk]
            words = pack_signs(part)
            if self.world_size > 1:
                gathered = words.new_empty(self.world_size * packed_words(part.numel()))
                self.comm.count(payload_bytes(words))
                with self.comm.timed(self.root_device):
                    all_gather_single(gathered, words)
                words = gathered
            votes.append(majority_vote_packed(words.view(self.world_size, -1), part.numel()))
        return torch.cat(votes) if votes else torch.zeros(0, dtype=torch.int8, device=own.device)

    @override
    def _reference_weights(self) -> list[Tensor]:
        """The parameters (identical on every worker) with the workers' averaged floating-point buffers."""
        averaged = super()._reference_weights()
        masks = iter(self._parameter_masks)
        return [
            torch.where(next(masks), bucket.pack(), flat) if bucket.floating else flat
            for bucket, flat in zip(self.layout.buckets, averaged)
        ]


def _split_like(flat: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    """Views of ``flat`` shaped like ``tensors`` (consecutive)."""
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
