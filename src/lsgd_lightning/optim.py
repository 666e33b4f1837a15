"""Katyusha X (Allen-Zhu, ICML 2018, arXiv:1802.03866): SVRG plus one momentum line, as plain tensor math.

Lightning-free (imports torch only): the pure functions of the update, a one-device ``KatyushaX`` optimizer, and a
helper that computes the snapshot's full gradient from a model, a loss function and a data loader.
``lsgd_lightning.strategies.katyusha_x`` uses the same functions for the data-parallel strategy.

Source of the algorithm
-----------------------
The paper's own pseudo-code box could not be read from this project's reference search: for arXiv:1802.03866 it
returns only the abstract (PMLR v80 page 179-185, arXiv listing: "by adding one additional line to the well-known
SVRG method. This line corresponds to momentum"). What is implemented is the best public statement found:

(A) the linear-coupling form of Katyusha X, as a public reading note of the paper restates it (the "Katyusha X"
    post, section "Framework of Katyusha-X"; strongly convex case, σ = strong convexity of the average f)::

        x_{k+1} = τ z_k + (1 − τ) y_k
        y_{k+1} = SVRG(f, x_{k+1})                        (one SVRG epoch of m steps started at x_{k+1})
        g_{k+1} = (x_{k+1} − y_{k+1}) / (m η)
        z_{k+1} = argmin_z { ‖z − z_k‖² / (2α) + ⟨g_{k+1}, z⟩ + σ/4 ‖z − y_{k+1}‖² },  τ = √(mησ)/2, α = mη/(2τ)

(B) eliminating z from (A) leaves one line between SVRG epochs (derived here, and checked in
    ``tests/test_katyusha_x.py``); with y_s the start of epoch s and x̃_{s+1} its output it reads::

        y_{s+1} = ( 3/2 · x̃_{s+1} + 1/2 · y_s − (1 − τ) · x̃_s ) / (1 + τ),        y_0 = x̃_0 = x_0

    the line two public implementations add to SVRG: ``uclaopt/IPSVRG`` ``matlab/InexactPrecdnTest.m`` (Liu, Feng and
    Yin, the authors of "Acceleration of SVRG and Katyusha X by Inexact Preconditioning", ICML 2019:
    ``x = (1.5*y_new + 0.5*x - (1-TAU)*y_old)/(1+TAU)``) and a JAX ``KatyushaXs`` class (same line).

(C) the SVRG epoch with mini-batches of b components (Johnson and Zhang 2013; mini-batch as in the note)::

        μ̃ = ∇f(x̃)                                        x̃ = y_s, one pass over all n components
        for t = 0, ..., m − 1:
            ∇̃_t = ∇f_B(x_t) − ∇f_B(x̃) + μ̃                 B: b components
            x_{t+1} = x_t − η ∇̃_t
        x̃_{s+1} = x_m                                     x_0 = x̃ = y_s

Symbols and names: x_t → the parameters; x̃ = y_s → ``snapshot``; x̃_s → ``previous_output``; x̃_{s+1} →
``epoch_output``; μ̃ → ``full_gradient``; η → ``lr``; m → ``epoch_length``; τ → ``tau``. τ = 1/2 is plain SVRG:
with y_0 = x̃_0 the line then gives y_s = x̃_s for every s (both public codes say so: "tau=0.5 is PSVRG").
Smaller τ means more momentum; (A) sets τ = √(mησ)/2 (:func:`theory_tau`, capped at 1/2 here).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .core.rules import katyusha_momentum, svrg_step, theory_tau, variance_reduced_gradient

__all__ = [
    "KatyushaX",
    "check_epoch_length",
    "check_tau",
    "full_gradient_closure",
    "katyusha_momentum",
    "svrg_step",
    "theory_tau",
    "variance_reduced_gradient",
]


def check_tau(tau: float) -> float:
    """τ must satisfy 0 < τ ≤ 1/2 (1/2 is plain SVRG; above 1/2 the line would push against the epoch's move)."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau <= 0.5:
        raise ValueError(f"tau must be a number with 0 < tau <= 0.5 (0.5 is plain SVRG), got {tau!r}")
    return float(tau)


def check_epoch_length(epoch_length: int) -> int:
    if isinstance(epoch_length, bool) or not isinstance(epoch_length, int) or epoch_length < 1:
        raise ValueError(f"epoch_length must be a positive integer (optimizer steps), got {epoch_length!r}")
    return epoch_length


class KatyushaX(Optimizer):
    """Katyusha X on one device: SVRG epochs of ``epoch_length`` steps with the momentum line between them.

    Args:
        params: the parameters (or param groups; ``lr`` may differ per group, schedulers work).
        lr: the step size η.
        epoch_length: m, steps per epoch (e.g. ``len(loader)`` for one pass).
        tau: τ in (0, 1/2]; 1/2 is plain SVRG.
        full_gradient: a callable that leaves ∇f(x) = (1/n) Σ_i ∇f_i(x), the full gradient at the current
            parameters, in their ``.grad`` (the optimizer zeroes ``.grad`` first), e.g.
            :func:`full_gradient_closure`. Called at the start of every epoch, at the snapshot.

    ``step(closure)`` needs the usual closure (zero the gradients, compute this batch's loss, ``backward()``, return
    the loss). It calls it twice: first with the parameters set to the snapshot x̃ (that gives ∇f_B(x̃)), then at x
    (∇f_B(x)); the random number generator is forked for the first call, so dropout draws the same masks in both.
    The closure must give the same mini-batch both times. Compute per step: two forward/backward passes, plus one
    pass over the data per epoch. Buffers (BatchNorm statistics) see the batch twice; this optimizer does not know
    the module, so it cannot protect them (the Lightning strategy does).

    Example::

        opt = KatyushaX(model.parameters(), lr=0.05, epoch_length=len(loader), tau=0.2,
                        full_gradient=full_gradient_closure(model, loss_fn, loader))
        for inputs, targets in loader:
            def closure():
                opt.zero_grad()
                loss = loss_fn(model(inputs), targets)
                loss.backward()
                return loss
            opt.step(closure)
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        epoch_length: int,
        tau: float,
        full_gradient: Callable[[], Any],
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        self.epoch_length = check_epoch_length(epoch_length)
        self.tau = check_tau(tau)
        self.full_gradient = full_gradient
        super().__init__(params, {"lr": lr})
        self.steps = 0

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _grads(self) -> list[Tensor]:
        return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in self._params()]

    @torch.no_grad()
    def _begin_epoch(self) -> None:
        for p in self._params():
            state = self.state[p]
            if "snapshot" in state:  # y_{s+1} from x̃_{s+1} (the current parameters), y_s and x̃_s
                new_start = katyusha_momentum(p, state["snapshot"], state["previous_output"], self.tau)
                state["previous_output"] = p.detach().clone()
                p.copy_(new_start)
            else:  # y_0 = x̃_0 = x_0
                state["previous_output"] = p.detach().clone()
            state["snapshot"] = p.detach().clone()
        self.zero_grad()
        with torch.enable_grad():
            self.full_gradient()
        for p, grad in zip(self._params(), self._grads()):
            self.state[p]["full_gradient"] = grad

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        if closure is None:
            raise ValueError("KatyushaX.step needs a closure: it evaluates the batch at the snapshot and at x")
        if self.steps % self.epoch_length == 0:
            self._begin_epoch()
        params = self._params()
        current = [p.detach().clone() for p in params]
        devices = sorted({p.device.index or 0 for p in params if p.is_cuda})
        for p in params:
            p.copy_(self.state[p]["snapshot"])
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            closure()
        at_snapshot = self._grads()
        for p, value in zip(params, current):
            p.copy_(value)
        with torch.enable_grad():
            loss = closure()
        lrs = [group["lr"] for group in self.param_groups for p in group["params"] if p.requires_grad]
        for p, grad_at_snapshot, lr in zip(params, at_snapshot, lrs):
            grad_at_x = torch.zeros_like(p) if p.grad is None else p.grad
            direction = variance_reduced_gradient(grad_at_x, grad_at_snapshot, self.state[p]["full_gradient"])
            p.copy_(svrg_step(p, direction, lr))
        self.steps += 1
        for p in params:
            self.state[p]["step"] = self.steps
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        steps = [s.get("step") for s in self.state.values() if "step" in s]
        self.steps = int(steps[0]) if steps else 0


def full_gradient_closure(
    model: torch.nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], loader: Iterable[tuple[Tensor, Tensor]]
) -> Callable[[], Tensor]:
    """A callable that leaves ∇f(x) = (1/n) Σ_i ∇f_i(x) in the model's ``.grad`` and returns f(x).

    ``loader`` yields ``(inputs, targets)``; ``loss_fn`` must return the mean over the batch. Each batch's loss is
    weighted by its size, so the last, smaller batch counts right. One forward/backward pass over the data.
    """

    def closure() -> Tensor:
        params = [p for p in model.parameters() if p.requires_grad]
        total, count = torch.zeros(()), 0
        for inputs, targets in loader:
            size = len(inputs)
            loss = loss_fn(model(inputs), targets)
            (loss * size).backward()
            total, count = total + loss.detach().cpu() * size, count + size
        if count == 0:
            raise ValueError("full_gradient_closure: the loader yielded no data")
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.grad.div_(count)
        return total / count

    return closure
