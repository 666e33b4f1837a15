"""A worker's recent training losses, kept on its device: its score (LSGD's election) and the divergence test."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .rules import window_score


class ScoreWindow:
    """Ring buffer of the last ``size`` training losses of one worker.

    Recording is a device-side copy (no host synchronization), so it can run on every step; only the round-time
    questions (:meth:`round_score`, :meth:`diverged`) read values on the host.

    Args:
        size: how many recent losses make the score (LSGD's ``leader_window``), >= 1.
        device: where the losses live (the strategy's root device).
    """

    def __init__(self, size: int, device: torch.device) -> None:
        self.size = size
        self.losses = torch.zeros(size, device=device)
        self.seen = 0

    def record(self, loss: Tensor) -> None:
        """Append one scalar loss (any float dtype; detached and stored as float32)."""
        self.losses[self.seen % self.size] = loss.detach().reshape(())
        self.seen += 1

    def record_output(self, output: Any) -> bool:
        """Record the loss of a ``training_step`` output (a scalar tensor or a mapping with ``"loss"``); ``False``
        if it holds none."""
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            return False
        self.record(loss)
        return True

    def clear(self) -> None:
        """Forget every loss (after a diverged worker was reset: its old losses say nothing about the new weights)."""
        self.seen = 0

    def recent(self) -> Tensor:
        """The ``min(size, seen)`` losses currently in the window, shape ``(n,)`` (order irrelevant)."""
        return self.losses[: min(self.seen, self.size)]

    def score(self) -> Tensor:
        """Mean of :meth:`recent`, +inf if empty or non-finite (0-d tensor on the device)."""
        return window_score(self.recent())

    def diverged(self, weights: Iterable[Tensor] = (), losses: bool = True) -> bool:
        """Whether any element of ``weights`` (e.g. the floating buckets) or, with ``losses``, a recent loss is
        non-finite. One fused max-norm over the weights (NaN and inf propagate; a finite max never overflows) and one
        host synchronization. ``losses=False`` under fp16 loss scaling: its non-finite losses are steps the scaler
        skips, not divergence."""
        tensors = [t for t in weights if t.numel()]
        checks = [torch.stack(torch._foreach_norm(tensors, math.inf))] if tensors else []
        if losses:
            checks.append(self.recent())
        return bool(checks) and not bool(torch.stack([torch.isfinite(c).all() for c in checks]).all())

    def round_score(self, weights: Iterable[Tensor] = (), losses: bool = True) -> Tensor:
        """The score a worker sends in a round: NaN if :meth:`diverged` (never elected, reset), else :meth:`score`."""
        if self.diverged(weights, losses):
            return torch.tensor(math.nan, device=self.losses.device)
        return self.score()

    def state_dict(self) -> dict[str, Any]:
        return {"losses": self.losses.detach().cpu().clone(), "losses_seen": self.seen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.losses.copy_(state["losses"].to(self.losses.device))
        self.seen = int(state["losses_seen"])


def all_diverged_error(strategy: str, step: int) -> RuntimeError:
    """The error every rank raises when no worker has a finite loss and finite weights left."""
    return RuntimeError(
        f"{strategy}: every worker diverged (non-finite training loss or weights) by step {step}; nothing finite "
        "is left to recover from. Lower the learning rate, add gradient clipping (Trainer(gradient_clip_val=...)), "
        "or resume from an earlier checkpoint."
    )
