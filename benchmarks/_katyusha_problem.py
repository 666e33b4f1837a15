"""The sum-of-non-convex problem of ``benchmarks/katyusha.py`` and an exact, vectorized simulator of P workers.

The problem is one linear system of shift-and-invert PCA, the application the Katyusha X paper names first (PCA/SVD):
with data rows a_1..a_n and Σ = (1/n) Σ_i a_i a_iᵀ, minimize

    f(x) = (1/n) Σ_i f_i(x),   f_i(x) = λ/2 ‖x‖² − ½ (a_iᵀx)² − cᵀx,   λ = λ_max(Σ) + gap,

whose minimizer solves (λI − Σ) x = c. Every f_i with ‖a_i‖² > λ is non-convex (Hessian λI − a_i a_iᵀ), while f is
gap-strongly convex: the sum-of-non-convex setting. Component smoothness L = max_i max(λ, ‖a_i‖² − λ), so the
condition number that governs SVRG and Katyusha X is κ = L / gap.

Simulating P workers with b samples each is exact: under Lightning's ``DistributedSampler`` worker r reads
``perm[r::P]`` of the epoch's permutation, so the P batches of step j together are ``perm[j·P·b:(j+1)·P·b]``, one
mini-batch of P·b (only the order of the floating-point sum differs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lsgd_lightning.optim import katyusha_momentum, theory_tau

METHODS = ("sgd", "svrg", "katyusha_x")


@dataclass
class Problem:
    a: Tensor  # n x d, float64
    c: Tensor
    lam: float
    hessian: Tensor = field(init=False)
    x_star: Tensor = field(init=False)
    f_star: float = field(init=False)

    def __post_init__(self) -> None:
        n, d = self.a.shape
        self.hessian = self.lam * torch.eye(d, dtype=torch.float64) - self.a.T @ self.a / n
        self.x_star = torch.linalg.solve(self.hessian, self.c)
        self.f_star = float(self.f(self.x_star[None])[0])

    def f(self, x: Tensor) -> Tensor:
        """f at each row of x (G x d)."""
        return 0.5 * ((x @ self.hessian) * x).sum(1) - x @ self.c

    def full_gradient(self, x: Tensor) -> Tensor:
        return x @ self.hessian - self.c

    def stats(self) -> dict[str, float]:
        eig = torch.linalg.eigvalsh(self.hessian)
        norms = self.a.square().sum(1)
        smoothness = float(torch.clamp(norms - self.lam, min=self.lam).max())
        return {
            "n": self.a.shape[0],
            "d": self.a.shape[1],
            "lambda": self.lam,
            "sigma": float(eig[0]),
            "L_components": smoothness,
            "L_average": float(eig[-1]),
            "kappa": smoothness / float(eig[0]),
            "nonconvex_fraction": float((norms > self.lam).double().mean()),
        }


def make_problem(n: int, dim: int, gap: float, seed: int = 0) -> Problem:
    """Gaussian rows with covariance eigenvalues spread linearly over [0.05, 1]; λ = λ_max(Σ) + gap."""
    gen = torch.Generator().manual_seed(seed)
    spectrum = torch.linspace(1.0, 0.05, dim, dtype=torch.float64)
    a = torch.randn(n, dim, generator=gen, dtype=torch.float64) * spectrum.sqrt()
    c = torch.randn(dim, generator=gen, dtype=torch.float64) / dim**0.5
    top = float(torch.linalg.eigvalsh(a.T @ a / n)[-1])
    return Problem(a, c, top + gap)


@dataclass
class Run:
    """Every configuration's relative suboptimality (f(x) − f*)/(f(x_0) − f*) against passes over the data."""

    configs: list[tuple[float, float | None, int]]  # (lr, tau, seed)
    passes: list[float] = field(default_factory=list)
    suboptimality: list[Tensor] = field(default_factory=list)  # one G-vector per evaluation
    x: Tensor | None = None
    steps: int = 0

    def settled(self, target: float) -> Tensor:
        """Per configuration, the passes from which the suboptimality stays <= target to the end of the run (inf:
        above it at the end). Stricter than the first touch: momentum methods may dip below a target and come back."""
        values = torch.stack(self.suboptimality)  # evaluations x G
        passes = torch.tensor([0.0, *self.passes], dtype=torch.float64)
        above = torch.cat([torch.ones(1, values.shape[1], dtype=torch.bool), values > target])
        last_above = (above * torch.arange(len(above))[:, None]).max(0).values  # index into [start, evals...]
        return torch.where(
            last_above < len(self.passes), passes[(last_above + 1).clamp(max=len(self.passes))], torch.inf
        )


def simulate(
    problem: Problem,
    method: str,
    workers: int,
    batch: int,
    lrs: list[float],
    taus: list[float | str | None],
    seeds: list[int],
    max_passes: float = 100.0,
    stop_at: float = 0.0,
    max_steps: int | None = None,
    evals_per_epoch: int = 8,
) -> Run:
    """SGD, SVRG or Katyusha X with P = ``workers`` x ``batch`` samples per step, every (lr, tau, seed) at once.

    ``taus`` may hold ``"theory"``: τ = √(mησ)/2 for each lr (σ the problem's strong convexity). The epoch (SVRG,
    Katyusha X) is one pass over each worker's shard: m = n / (P·b) steps. Passes count gradient
    evaluations of components divided by n: SGD P·b per step; SVRG and Katyusha X 2·P·b per step (at x and at the
    snapshot) plus n per epoch (the snapshot's full gradient).
    """
    a, (n, d) = problem.a, problem.a.shape
    per_step = workers * batch
    if n % per_step:
        raise ValueError(f"n = {n} must be a multiple of workers x batch = {per_step}")
    m = n // per_step
    sigma = problem.stats()["sigma"]
    configs = [
        (lr, theory_tau(m, lr, sigma) if tau == "theory" else tau, seed) for lr in lrs for tau in taus for seed in seeds
    ]
    lr = torch.tensor([cfg[0] for cfg in configs], dtype=torch.float64)[:, None]
    seed_of = torch.tensor([seeds.index(cfg[2]) for cfg in configs])
    x = torch.zeros(len(configs), d, dtype=torch.float64)
    snapshot, previous, mu = x.clone(), x.clone(), torch.zeros_like(x)
    gap0 = float(problem.f(x[:1])[0]) - problem.f_star
    run = Run(configs)
    passes, step, order = 0.0, 0, torch.empty(0)
    dead = torch.zeros(len(configs), dtype=torch.bool)  # diverged: parked at 0, never counted as reaching
    while (passes < max_passes) if max_steps is None else (step < max_steps):
        epoch, j = divmod(step, m)
        if j == 0:  # DistributedSampler's permutation of this epoch, per seed; step j reads block j
            order = torch.stack(
                [torch.randperm(n, generator=torch.Generator().manual_seed(s + epoch)) for s in seeds]
            ).view(len(seeds), m, per_step)
            if method != "sgd":
                if step > 0 and method == "katyusha_x":
                    tau = torch.tensor([cfg[1] for cfg in configs], dtype=torch.float64)[:, None]
                    x, previous = katyusha_momentum(x, snapshot, previous, tau), x  # type: ignore[arg-type]
                elif step > 0:
                    previous = x
                snapshot, mu = x.clone(), problem.full_gradient(x)
                passes += 1.0
        rows = a[order[seed_of, j]]  # G x P·b x d
        point = x if method == "sgd" else x - snapshot
        curvature = torch.einsum("gbd,gb->gd", rows, torch.einsum("gbd,gd->gb", rows, point)) / per_step
        grad = problem.lam * point - curvature
        grad = grad - problem.c if method == "sgd" else grad + mu
        x = x - lr * grad
        passes += per_step / n * (1 if method == "sgd" else 2)
        step += 1
        if step % max(1, m // evals_per_epoch) == 0 or step == max_steps:
            sub = (problem.f(x) - problem.f_star) / gap0
            dead |= ~torch.isfinite(sub) | (sub > 1e6)
            sub = torch.where(dead, torch.inf, sub)
            run.passes.append(passes)
            run.suboptimality.append(sub)
            if stop_at > 0 and bool(((sub <= stop_at) | dead).all()):
                break
            x, lr = torch.where(dead[:, None], 0.0, x), torch.where(dead[:, None], 0.0, lr)
    run.x, run.steps = x, step
    return run


class QuadraticSum(pl.LightningModule):
    """The problem as a LightningModule for the real multi-process check (x is the only parameter)."""

    def __init__(self, problem: Problem, lr: float) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.zeros(problem.a.shape[1], dtype=torch.float64))
        self.c, self.lam, self.lr = problem.c, problem.lam, lr

    def training_step(self, batch: tuple[Tensor], batch_idx: int) -> Tensor:
        (rows,) = batch
        return (0.5 * self.lam * self.x.square().sum() - 0.5 * (rows @ self.x).square() - self.c @ self.x).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)
