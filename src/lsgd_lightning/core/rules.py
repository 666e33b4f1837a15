"""The update rules of every strategy, as pure functions of tensors: no Lightning, no communication, no state.

A strategy gathers the inputs with collectives (or reads them from a board), calls one of these functions and writes
the result back into the model. Each function returns new tensors and leaves its arguments untouched, so a rule can
be tested in one process against values computed by hand (``tests/test_rules.py``).

Shapes: a *flat* tensor is one bucket of a worker's parameters and floating-point buffers, shape ``(d,)``, in the
model's dtype; arguments named like it have its shape. Strengths, rates and weights are dimensionless scalars.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# ------------------------------------------------------------------------------------------------------------------
# Leader SGD (Teng et al., NeurIPS 2019, arXiv:1905.10395)
# ------------------------------------------------------------------------------------------------------------------


def window_score(losses: Tensor) -> Tensor:
    """A worker's score: the mean of its recent training losses ``(n,)``; +inf if ``n == 0`` or not finite.

    LSGD elects the worker with the lowest score (the paper averages the last few batches' losses: 10 on CIFAR-10).
    Returns a 0-d tensor on ``losses.device``; no host synchronization.
    """
    if losses.numel() == 0:
        return torch.tensor(math.inf, device=losses.device)
    score = losses.mean()
    return torch.where(torch.isfinite(score), score, torch.full_like(score, math.inf))


def elect_leader(scores: Tensor) -> int | None:
    """Index of the lowest finite score in ``scores`` ``(P,)`` (ties: the lowest index), or ``None`` if none is finite.

    A NaN marks a diverged worker and +inf one without a finite loss: neither is ever elected. Synchronizes with the
    host once (the result decides which collectives follow).
    """
    finite = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, math.inf))
    if not bool(torch.isfinite(finite).any()):
        return None
    return int(torch.argmin(finite))  # argmin returns the first minimal index


def leader_pull(x: Tensor, leader: Tensor, strength: float) -> Tensor:
    """LSGD's pull of one worker toward the leader: ``x - λ (x - x_leader)`` (λ = ``strength`` in [0, 1]).

    Applied outside the optimizer every τ steps, so momentum never sees it; the leader itself does not move
    (``x == x_leader`` gives ``x`` back exactly).
    """
    return torch.add(x, leader - x, alpha=strength)


def multi_leader_pull(
    x: Tensor, local_leader: Tensor | None, global_leader: Tensor | None, local_strength: float, global_strength: float
) -> Tensor:
    """Multi-leader LSGD, both pulls from the weights before the round (the poster's eq. 2)::

        x - λ_L (x - x_local) - λ_G (x - x_global)

    A leader given as ``None`` is not due this round (its term is dropped).
    """
    moved = x.clone()
    if local_leader is not None:
        moved.add_(local_leader - x, alpha=local_strength)
    if global_leader is not None:
        moved.add_(global_leader - x, alpha=global_strength)
    return moved


# ------------------------------------------------------------------------------------------------------------------
# Elastic Averaging SGD (Zhang, Choromanska, LeCun, NIPS 2015, arXiv:1412.6651)
# ------------------------------------------------------------------------------------------------------------------


def elastic_alpha(beta: float, moving_rate: float | None, workers: int) -> float:
    """EASGD's moving rate α: ``moving_rate`` if given, else the paper's β / P."""
    return moving_rate if moving_rate is not None else beta / workers


def elastic_round(x: Tensor, center: Tensor, workers_sum: Tensor, workers: int, alpha: float) -> tuple[Tensor, Tensor]:
    """Synchronous EASGD (Sec. 3), from the values before the round::

        x_i <- x_i - α (x_i - c)
        c   <- c + α Σ_j (x_j - c) = c + n α (mean_j x_j - c)

    ``workers_sum`` is Σ_j x_j over the ``workers`` (n) workers that take part. Returns ``(x_i', c')``.
    """
    new_center = torch.add(center, workers_sum / workers - center, alpha=workers * alpha)
    return torch.add(x, center - x, alpha=alpha), new_center


def elastic_exchange(x: Tensor, center: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Asynchronous EASGD (Algorithm 1), one worker's exchange with the center it read::

        δ = α (x - c);   x <- x - δ;   c <- c + δ

    Returns ``(x', c')``.
    """
    delta = (x - center).mul_(alpha)
    return x - delta, center + delta


def eamsgd_local_step(
    x: Tensor, velocity: Tensor, lookahead: Tensor, gradient: Tensor, lr: float, momentum: float, weight_decay: float
) -> tuple[Tensor, Tensor, Tensor]:
    """EAMSGD's local step (Sec. 3.2, eq. 7; Algorithm 2), the momentum seeing the gradient only::

        v <- δ v - η (g + λ y)        g: the stochastic gradient at the look-ahead point y = x + δ v
        x <- x + v
        y <- x + δ v                  where the next gradient is taken

    ``momentum`` is δ, ``weight_decay`` λ (the gradient of λ/2 ||·||² at y, as in the authors' code). The elastic
    force moves x alone (:func:`elastic_round`, :func:`elastic_exchange`), never v. Returns ``(x', v', y')``.
    """
    new_velocity = velocity * momentum - lr * (gradient + weight_decay * lookahead)
    new_x = x + new_velocity
    return new_x, new_velocity, new_x + momentum * new_velocity


# ------------------------------------------------------------------------------------------------------------------
# DOWNPOUR (Dean et al., NIPS 2012)
# ------------------------------------------------------------------------------------------------------------------


def downpour_round(
    held: Tensor, x: Tensor, baseline: Tensor, is_parameter: Tensor, push: bool, fetch: bool, push_scale: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """One DOWNPOUR round with Dean et al.'s separate periods (n_push, n_fetch): ``x - baseline`` is the worker's
    update accrued since its last push. Push: ``w <- w + s (x - baseline)``, nothing is accrued any more
    (``baseline <- x``); fetch: ``x <- w``, the accrued update carried over (``baseline <- w - accrued``). Both: the
    push first, so the fetched ``w`` holds it. Buffers (``is_parameter`` False) are copied, never summed: pushed
    from the worker, fetched from the holder. ``s`` is ``push_scale``. All tensors have one shape (a flat bucket;
    ``is_parameter`` bool). Returns ``(w', x', baseline')``.
    """
    if push:
        held = torch.where(is_parameter, held + push_scale * (x - baseline), x)
        baseline = x
    if fetch:
        accrued = x - baseline
        x, baseline = held, torch.where(is_parameter, held - accrued, held)
    return held, x, baseline


# ------------------------------------------------------------------------------------------------------------------
# Decentralized SGD: D-PSGD (Lian et al. 2017), D² (Tang et al. 2018), AD-PSGD (Lian et al. 2018)
# ------------------------------------------------------------------------------------------------------------------


def gossip_mix(own: Tensor, self_weight: float, received: Sequence[tuple[float, Tensor]]) -> Tensor:
    """One worker's row of the mixing matrix applied: ``Σ_j W_ij x_j = W_ii x_i + Σ_{j≠i} W_ij x_j``.

    ``received`` holds ``(W_ij, x_j)`` for the neighbours, in the order they are summed.
    """
    mixed = own * self_weight
    for weight, theirs in received:
        mixed.add_(theirs, alpha=weight)
    return mixed


def with_local_step(mixed: Tensor, before: Tensor, after: Tensor) -> Tensor:
    """D-PSGD and AD-PSGD: the gossip average plus the worker's own optimizer step taken from ``before``.

    ``x <- Σ_j W_ij x_j + (x_after_step - x_before_step)``: for plain SGD the second term is ``-lr g_i`` with the
    gradient taken at ``before`` (Lian et al. 2017, Algorithm 1).
    """
    return mixed + (after - before)


def d2_bracket(after: Tensor, before: Tensor, previous_after: Tensor, is_parameter: Tensor) -> Tensor:
    """What a D² worker gossips (Tang et al. 2018, Algorithm 1): ``2 X_t - X_{t-1} - lr G_t + lr G_{t-1}``.

    With ``y_t = X_t - lr G_t`` (``after``: the weights after the local step from ``before`` = X_t) the bracket is
    ``y_t + X_t - y_{t-1}`` (``previous_after`` = y_{t-1}). Buffers (``is_parameter`` False) are gossiped as they are.
    """
    return torch.where(is_parameter, after + (before - previous_after), after)


def pair_average(mine: Tensor, theirs: Tensor) -> Tensor:
    """AD-PSGD's atomic pairwise average ``(x_i + x_j) / 2``; bitwise the same on both sides (addition commutes)."""
    return (mine + theirs) / 2


# ------------------------------------------------------------------------------------------------------------------
# Signum with majority vote (Bernstein et al., ICML 2018 arXiv:1802.04434; ICLR 2019 arXiv:1810.05291)
# ------------------------------------------------------------------------------------------------------------------


def signum_momentum(momentum: Tensor, gradient: Tensor | None, beta: float) -> Tensor:
    """``m <- β m + (1 - β) g``; a parameter without a gradient this step counts as ``g = 0``."""
    updated = momentum * beta
    return updated if gradient is None else updated.add_(gradient, alpha=1 - beta)


def majority_vote(positives: Tensor, workers: int) -> Tensor:
    """The vote ``sign(Σ_j sign_j)`` per coordinate, given how many of the ``workers`` voted +1 (``positives``, int).

    Σ_j sign_j = positives - (workers - positives). Returns int8 in {-1, 0, +1}; 0 is a tie (an even P only).
    """
    return torch.sign(2 * positives.to(torch.int32) - workers).to(torch.int8)


def signum_step(x: Tensor, vote: Tensor, lr: float, weight_decay: float) -> Tensor:
    """``x - lr (vote + weight_decay x)``: the voted direction plus decoupled weight decay (the authors' code)."""
    return torch.add(x, vote.to(x.dtype).add(x, alpha=weight_decay), alpha=-lr)


# ------------------------------------------------------------------------------------------------------------------
# Katyusha X (Allen-Zhu, ICML 2018, arXiv:1802.03866): SVRG plus one momentum line; sources in lsgd_lightning.optim
# ------------------------------------------------------------------------------------------------------------------


def variance_reduced_gradient(grad_at_x: Tensor, grad_at_snapshot: Tensor, full_gradient: Tensor) -> Tensor:
    """∇̃ = ∇f_B(x) − ∇f_B(x̃) + μ̃ (C, line 3). All three have the parameter's shape; so does the result."""
    return grad_at_x - grad_at_snapshot + full_gradient


def svrg_step(x: Tensor, gradient: Tensor, lr: float) -> Tensor:
    """x_{t+1} = x_t − η ∇̃_t (C, line 4), out of place; ``x`` and ``gradient`` have the same shape."""
    return x - lr * gradient


def katyusha_momentum(epoch_output: Tensor, snapshot: Tensor, previous_output: Tensor, tau: float) -> Tensor:
    """The momentum line between epochs (B): y_{s+1} = (3/2 x̃_{s+1} + 1/2 y_s − (1 − τ) x̃_s) / (1 + τ).

    ``epoch_output`` is x̃_{s+1}, ``snapshot`` y_s (where epoch s started), ``previous_output`` x̃_s; all the same
    shape. Computed in the equal form x̃_{s+1} + (½(y_s − x̃_s) + (½ − τ)(x̃_{s+1} − x̃_s)) / (1 + τ), so that
    τ = 1/2 with y_s = x̃_s returns x̃_{s+1} bit for bit (plain SVRG).
    """
    correction = 0.5 * (snapshot - previous_output) + (0.5 - tau) * (epoch_output - previous_output)
    return epoch_output + correction / (1 + tau)


def theory_tau(epoch_length: int, lr: float, sigma: float) -> float:
    """τ = √(m η σ) / 2 from (A), capped at 1/2; σ is the strong convexity of the average f."""
    if epoch_length < 1 or lr <= 0 or sigma <= 0:
        raise ValueError(f"need epoch_length >= 1, lr > 0, sigma > 0; got {epoch_length}, {lr}, {sigma}")
    return min(0.5, math.sqrt(epoch_length * lr * sigma) / 2)


def squared_distance(a: Tensor, b: Tensor) -> Tensor:
    """``||a - b||²`` in float64 (a 0-d tensor), for the ``*/dist_to_*`` metrics."""
    return (a.double() - b.double()).square().sum()
