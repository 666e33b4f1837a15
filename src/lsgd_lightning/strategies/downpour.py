"""DOWNPOUR SGD (Dean et al., NIPS 2012), the asynchronous parameter-server baseline of the LSGD and EASGD papers.

A parameter holder keeps the model w in rank 0's process (:mod:`~lsgd_lightning.core.holder`, reached by
``torch.distributed.rpc``, under a lock on the job's store: :class:`~lsgd_lightning.core.board.StoreBoard`). Every
worker trains its replica at its own pace. As in Dean et al.'s Downpour client (their Algorithm 7.1, parameters
n_fetch and n_push), a worker pushes the update it accrued every ``push_every`` of its *own* optimizer steps and
fetches the parameters every ``fetch_every``; with ``b`` the point its accrued update is measured from (its
*baseline*)::

    push:   w <- w + s (x_i - b)      b <- x_i           (x_i - b: its local updates since the last push)
    fetch:  x_i <- w                  b <- w - (x_i - b) (the update accrued and not yet pushed is kept)

A push and a fetch due after the same step are one transaction, the push first (so the worker fetches its own push):
``w <- w + s (x_i - b); x_i <- w; b <- w``, the EASGD paper's DOWNPOUR with period τ. Each round is one transaction
under the board's lock, so every pushed update is applied exactly once, to the w that the previous push left
(updates computed from older parameters are applied as they are: DOWNPOUR's staleness). The worker's optimizer state
(momentum) stays local. Buffers are not trained by gradients and summing their moves would overshoot (BatchNorm's
running variance could turn negative), so a push hands the holder the pushing worker's floating-point buffers and a
fetch hands the worker the holder's; integer buffers stay local. A diverged worker (non-finite recent loss or
weights) pushes nothing and is reset to w with fresh optimizer state.

``s`` is ``push_scale``: 1 (default) is DOWNPOUR as written; ``"1/P"`` lets the holder add 1/world_size of each
pushed update, so that P workers together move w about as far as one step of the optimizer's learning rate (with
``push_every = fetch_every = 1`` this is exactly every worker's learning rate divided by P).

Defaults: ``tau=1`` (push and fetch after every step), the EASGD paper's setting for DOWNPOUR (Zhang et al. 2015,
Sec. 5, as read from a transcription of the paper: DOWNPOUR and MDOWNPOUR were run with τ = 1 in the experiments of
Figs. 3 and 4; in Fig. 2 the DOWNPOUR-based methods did best at τ ∈ {1, 4} and became unstable at τ ∈ {16, 64}).

Communicated per round, to and from the rank-0 process (``weight_transport``: by RPC, or as values on the store;
d = floating-point parameters and buffers,
4·d bytes for float32): a push reads and writes w (8·d), a fetch reads it (4·d), both together 8·d.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor
from typing_extensions import override

from ..core.rules import downpour_round
from .asynchronous import AsynchronousStrategy
from .checkpoints import restored_flats, saved_flats
from .checks import check_downpour_options


class DownpourStrategy(AsynchronousStrategy):
    """DOWNPOUR: every ``push_every`` of its own steps a worker pushes its accrued update to the parameter holder,
    every ``fetch_every`` it fetches the holder's parameters.

    Args:
        tau: the period of both, where ``push_every`` or ``fetch_every`` is not given (>= 1; default 1, the EASGD
            paper's DOWNPOUR setting).
        push_every: a worker's optimizer steps between its pushes (Dean et al.'s n_push); default ``tau``.
        fetch_every: a worker's optimizer steps between its fetches (n_fetch); default ``tau``.
        push_scale: the fraction of a pushed update the holder adds, in (0, 1], or ``"1/P"`` (1 / world_size).
        weight_transport, rpc_options: how the shared weights travel to and from rank 0's process, which holds them
            (``"rpc"``, default, or ``"store"``; see :class:`~.asynchronous.AsynchronousStrategy`).
        **kwargs: :class:`~.base.ReplicaStrategy`'s ``eval_on`` (evaluate the held parameters, or ``"local"``),
            ``final_sync``, ``bucket_cap_mb``, ``timeout``, ``start_method`` and Lightning's process arguments.

    ``self.tau`` is the greatest common divisor of the two periods: rounds fall on its multiples (not on all of them).
    Registered as ``"downpour"`` (subprocess launcher) and ``"downpour_spawn"`` (spawn launcher).
    """

    strategy_name: ClassVar[str] = "downpour"
    reference_name: ClassVar[str] = "parameters"
    shared_name: ClassVar[str] = "parameters"

    def __init__(
        self,
        tau: int = 1,
        push_every: int | None = None,
        fetch_every: int | None = None,
        push_scale: float | str = 1.0,
        **kwargs: Any,
    ) -> None:
        self.push_every, self.fetch_every, self.push_scale = check_downpour_options(
            tau, push_every, fetch_every, push_scale
        )
        super().__init__(tau=math.gcd(self.push_every, self.fetch_every), **kwargs)
        self._baseline: list[Tensor] = []  # per floating bucket: where the accrued update is measured from
        self._is_parameter: list[Tensor] = []  # per floating bucket: True where an element is a parameter

    @property
    def scale(self) -> float:
        """The fraction of a pushed update that the holder adds."""
        return 1.0 / self.world_size if self.push_scale == "1/P" else float(self.push_scale)

    @override
    def _round_due(self, step: int) -> bool:
        return step % self.push_every == 0 or step % self.fetch_every == 0

    @override
    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        assert self.lightning_module is not None
        self._is_parameter = self.layout.parameter_masks(self.lightning_module)

    @override
    def _on_fresh_start(self) -> None:
        self._baseline = self.layout.masters()

    @override
    def _communication_round(self) -> dict[str, float]:
        push, fetch = self._steps % self.push_every == 0, self._steps % self.fetch_every == 0
        diverged = self.is_diverged()
        own = self.layout.masters()
        with self.board.locked():
            held = self.board.get(self.shared_name, like=own)
            if not diverged:
                rounds = [
                    downpour_round(w, x, b, m, push, fetch, self.scale)
                    for w, x, b, m in zip(held, own, self._baseline, self._is_parameter)
                ]
                if push:
                    self.board.put(self.shared_name, [w for w, _, _ in rounds])
        if diverged:
            self._reset_to(self._with_own_integers(held), self.reference_name)
            self._baseline = [w.clone() for w in held]  # the accrued update is dropped with the diverged weights
            return {}
        metrics: dict[str, float] = {}
        if push:
            pushed = [(x - b)[m] for x, b, m in zip(own, self._baseline, self._is_parameter)]
            metrics["downpour/update_norm"] = math.sqrt(sum(float(d.double().square().sum()) for d in pushed))
        if fetch:
            for bucket, (_, x, _) in zip(self.layout.floating_buckets, rounds):
                bucket.unpack(x)
        self._baseline = [b.clone() for _, _, b in rounds]
        return metrics

    @override
    def _extra_state_dict(self) -> dict[str, Any]:
        return {"baseline": saved_flats(self._baseline)}

    @override
    def _load_extra_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state.get("baseline", state.get("fetched"))  # "fetched": shards written before the two periods
        self._baseline = restored_flats(saved, self.layout.floating_buckets, "DOWNPOUR state")
