"""DOWNPOUR SGD (Dean et al., NIPS 2012), the asynchronous parameter-server baseline of the LSGD and EASGD papers.

A parameter holder keeps the model w on the job's store (:class:`~._board.StoreBoard`). Every worker trains its
replica at its own pace from the parameters it last fetched, x_fetched; after every ``tau``-th of its *own* optimizer
steps, worker i pushes its accumulated update and fetches fresh parameters, in one transaction under the board's
lock::

    delta_i = x_i - x_fetched          (the sum of its tau local updates; parameters only)
    w       <- w + delta_i             (the holder applies the update)
    x_i     <- w ; x_fetched <- w      (fetch)

Transactions are serialized by the lock, so every pushed update is applied exactly once, to the w that the previous
push left (updates computed from older parameters are applied as they are: DOWNPOUR's staleness). The worker's
optimizer state (momentum) stays local. Buffers are not trained by gradients and summing their moves would
overshoot (BatchNorm's running variance could turn negative), so the holder keeps the floating-point buffers of the
latest pushing worker; integer buffers stay local. A diverged worker (non-finite recent loss or weights) pushes
nothing and is reset to w with fresh optimizer state.

Communicated per round: w read and written back plus nothing else, 2 · 4·d bytes for float32 (d = floating-point
parameters and buffers), through the store served by the rank-0 process: 8·d / tau bytes per step. With ``tau=1``
this is the classic DOWNPOUR (push every step); the LSGD paper uses the same tau as for the other methods.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from ._asynchronous import AsynchronousStrategy


class DownpourStrategy(AsynchronousStrategy):
    """DOWNPOUR: every ``tau`` of its own steps, a worker pushes its accumulated update to the parameter holder and
    fetches the holder's parameters.

    Args:
        tau: a worker's optimizer steps between its pushes (>= 1).
        eval_on: ``"parameters"`` (validation/test see the holder's parameters on every rank) or ``"local"``.
        final_sync: when ``fit`` ends, every worker takes the holder's parameters.
        bucket_cap_mb: largest flat buffer per transfer unit, in MiB.
        **ddp_kwargs: process-group arguments of Lightning's ``DDPStrategy``.

    Registered as ``"downpour"`` (subprocess launcher) and ``"downpour_spawn"`` (spawn launcher).
    """

    strategy_name: ClassVar[str] = "downpour"
    reference_name: ClassVar[str] = "parameters"

    def __init__(
        self,
        tau: int = 16,
        eval_on: str = "parameters",
        final_sync: bool = True,
        bucket_cap_mb: float = 25.0,
        **ddp_kwargs: Any,
    ) -> None:
        super().__init__(tau=tau, eval_on=eval_on, final_sync=final_sync, bucket_cap_mb=bucket_cap_mb, **ddp_kwargs)
        self._fetched: list[Tensor] = []  # per floating bucket: the parameters as last fetched from the holder
        self._is_parameter: list[Tensor] = []  # per floating bucket: True where an element is a parameter

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        assert self.lightning_module is not None
        self._is_parameter = self.layout.parameter_masks(self.lightning_module)

    def _on_fresh_start(self) -> None:
        self._fetched = [bucket.pack() for bucket in self.layout.floating_buckets]

    def _publish_initial(self, resumed_reference: list[Tensor] | None) -> None:
        self.board.put("parameters", self._floating(resumed_reference or self.layout.pack()))

    def _communication_round(self) -> dict[str, float]:
        diverged = self.is_diverged()
        buckets = self.layout.floating_buckets
        own = [bucket.pack() for bucket in buckets]
        with self.board.locked():
            held = self.board.get("parameters", like=own)
            if not diverged:
                for w, x, fetched, is_parameter in zip(held, own, self._fetched, self._is_parameter):
                    # parameters: w + (x - x_fetched); buffers: this worker's latest statistics
                    torch.where(is_parameter, w + (x - fetched), x, out=w)
                self.board.put("parameters", held)
        metrics: dict[str, float] = {}
        if diverged:
            self._reset_to(self._with_own_integers(held), "parameters")
        else:
            pushed = [(x - f)[m] for x, f, m in zip(own, self._fetched, self._is_parameter)]
            metrics["downpour/update_norm"] = math.sqrt(sum(float(d.double().square().sum()) for d in pushed))
            for bucket, w in zip(buckets, held):
                bucket.unpack(w)
        self._fetched = [w.clone() for w in held]
        return metrics

    def _reference_weights(self) -> list[Tensor]:
        like = [bucket.pack() for bucket in self.layout.floating_buckets]
        with self.board.locked():
            return self._with_own_integers(self.board.get("parameters", like=like))

    def _extra_state_dict(self) -> dict[str, Any]:
        return {"fetched": [f.detach().cpu().clone() for f in self._fetched]}

    def _load_extra_state_dict(self, state: Mapping[str, Any]) -> None:
        buckets = self.layout.floating_buckets
        saved = list(state.get("fetched", []))
        if len(saved) != len(buckets) or any(f.numel() != b.numel for f, b in zip(saved, buckets)):
            raise RuntimeError("The checkpoint's DOWNPOUR state does not match this model's parameters.")
        self._fetched = [f.to(device=b.device, dtype=b.dtype) for f, b in zip(saved, buckets)]
