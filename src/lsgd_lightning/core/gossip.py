"""Gossip topologies (mixing matrices) and the point-to-point exchange with neighbours.

A *mixing matrix* W (P x P) says how worker i averages: ``x_i <- sum_j W[i, j] x_j``. Worker i therefore receives
from every j with ``W[i, j] > 0`` and sends to every j with ``W[j, i] > 0``. All matrices here are doubly stochastic
(non-negative, every row and every column sums to 1), so gossip keeps the workers' average where it is.

Topologies (``topology=`` of the gossip strategies):

- ``"ring"``: i averages itself and its two ring neighbours i-1, i+1 (mod P) with weights 1/3 each. With P = 2 the
  two neighbours are one worker: weights 1/2, 1/2. Symmetric; eigenvalues 1/3 + 2/3 cos(2 pi k / P), so the
  smallest is exactly -1/3 on an even ring.
- ``"exponential"``: one shifting peer (time-varying). After optimizer step t (1-based) with k = (t - 1) mod
  ceil(log2 P), worker i averages with the worker 2^k places behind it, ``x_i <- (x_i + x_{i - 2^k}) / 2``, and
  sends to the worker 2^k ahead. One send and one receive per step; not symmetric, but doubly stochastic, and with
  P a power of two ceil(log2 P) consecutive steps average exactly.
- a P x P matrix (nested lists, e.g. from a Hydra config): symmetric, doubly stochastic, with
  ρ = max(|λ_2|, |λ_P|) < 1 (checked when the Trainer is built; the error gives ρ).

``lazy=True`` uses (W + I) / 2 instead: every worker keeps half of its own weights. Its eigenvalues are
(1 + eig(W)) / 2 >= 0, which is what D² needs on an even ring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .collectives import CommMeter, payload_bytes
from .flat import to_master
from .rules import gossip_mix

BUILTIN_TOPOLOGIES = ("ring", "exponential")
_TOLERANCE = 1e-6


@dataclass(frozen=True)
class MixingPlan:
    """One worker's row of W for one step: whom it receives from (and with which weight) and whom it sends to."""

    self_weight: float
    receive_from: tuple[tuple[int, float], ...]
    send_to: tuple[int, ...]


def ring_matrix(world_size: int) -> Tensor:
    """Ring with weights 1/3 (self and both neighbours); P = 2: 1/2 each; P = 1: [[1]]."""
    matrix = torch.zeros(world_size, world_size, dtype=torch.float64)
    for i in range(world_size):
        neighbourhood = {i, (i - 1) % world_size, (i + 1) % world_size}
        for j in neighbourhood:
            matrix[i, j] = 1.0 / len(neighbourhood)
    return matrix


def exponential_period(world_size: int) -> int:
    """Number of distinct one-peer matrices: ceil(log2 P) (1 for P <= 2)."""
    return max(1, math.ceil(math.log2(world_size))) if world_size > 1 else 1


def exponential_offset(world_size: int, step: int) -> int:
    """The peer distance 2^k used after optimizer step ``step`` (1-based)."""
    return 2 ** ((step - 1) % exponential_period(world_size))


def exponential_matrix(world_size: int, step: int) -> Tensor:
    """One shifting peer: x_i <- (x_i + x_{i - 2^k}) / 2 with k = (step - 1) mod ceil(log2 P)."""
    matrix = torch.eye(world_size, dtype=torch.float64)
    if world_size == 1:
        return matrix
    offset = exponential_offset(world_size, step)
    for i in range(world_size):
        matrix[i, i] = 0.5
        matrix[i, (i - offset) % world_size] += 0.5
    return matrix


def lazy_matrix(matrix: Tensor) -> Tensor:
    """(W + I) / 2."""
    return (matrix + torch.eye(matrix.shape[0], dtype=matrix.dtype)) / 2


def smallest_eigenvalue(matrix: Tensor) -> float:
    """Smallest eigenvalue of a symmetric matrix."""
    return float(torch.linalg.eigvalsh(matrix.double()).min())


def plan_from_matrix(matrix: Tensor, rank: int) -> MixingPlan:
    """Row ``rank`` of W as a :class:`MixingPlan` (receive where W[rank, j] > 0, send where W[j, rank] > 0)."""
    size = matrix.shape[0]
    receive = tuple((j, float(matrix[rank, j])) for j in range(size) if j != rank and matrix[rank, j] > 0)
    send = tuple(j for j in range(size) if j != rank and matrix[j, rank] > 0)
    return MixingPlan(float(matrix[rank, rank]), receive, send)


class Topology:
    """The mixing matrix of every step for P workers (built once the number of workers is known).

    Args:
        spec: ``"ring"``, ``"exponential"`` or a P x P doubly stochastic matrix (nested sequences of numbers).
        world_size: P.
        lazy: use (W + I) / 2.
    """

    def __init__(self, spec: str | Sequence[Sequence[float]] | Tensor, world_size: int, lazy: bool = False) -> None:
        self.spec = spec
        self.world_size = world_size
        self.lazy = lazy
        self.time_varying = spec == "exponential"
        self._static: Tensor | None = None
        self._plans: dict[tuple[int, int], MixingPlan] = {}
        check_topology_spec(spec)
        if isinstance(spec, str):
            if spec == "ring":
                self._static = self._maybe_lazy(ring_matrix(world_size))
        else:
            self._static = self._maybe_lazy(check_mixing_matrix(spec, world_size))

    @property
    def name(self) -> str:
        base = self.spec if isinstance(self.spec, str) else "matrix"
        return f"lazy {base}" if self.lazy else base

    def _maybe_lazy(self, matrix: Tensor) -> Tensor:
        return lazy_matrix(matrix) if self.lazy else matrix

    def matrix(self, step: int) -> Tensor:
        """W for the exchange after optimizer step ``step`` (1-based), float64."""
        if self._static is not None:
            return self._static.clone()
        return self._maybe_lazy(exponential_matrix(self.world_size, step))

    @property
    def static_matrix(self) -> Tensor | None:
        """W if it is the same every step, else ``None``."""
        return None if self._static is None else self._static.clone()

    def plan(self, rank: int, step: int) -> MixingPlan:
        """This rank's row of W after optimizer step ``step`` (cached: a few distinct plans per run)."""
        key = (rank, 0 if self._static is not None else (step - 1) % exponential_period(self.world_size))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = plan_from_matrix(self.matrix(step), rank)
        return plan


class Mixing:
    """A gossip strategy's topology setting: checked when given, built into a :class:`Topology` once P is known.

    Args:
        spec: ``"ring"``, ``"exponential"`` or a P x P matrix (checked when built).
        lazy: use (W + I) / 2.
    """

    def __init__(self, spec: str | Sequence[Sequence[float]] | Tensor, lazy: bool) -> None:
        check_topology_spec(spec)
        if not isinstance(lazy, bool):
            raise ValueError(f"lazy must be True or False, got {lazy!r}.")
        self.spec, self.lazy = spec, lazy
        self.topology: Topology | None = None

    def build(self, world_size: int) -> Topology:
        """The topology for ``world_size`` workers (``ValueError`` for a matrix that does not fit)."""
        self.topology = Topology(self.spec, world_size, lazy=self.lazy)
        return self.topology

    def plan(self, rank: int, step: int) -> MixingPlan:
        """This rank's row of W after optimizer step ``step``."""
        assert self.topology is not None, "built when the Trainer is"
        return self.topology.plan(rank, step)


def check_topology_spec(spec: Any) -> None:
    """``ValueError`` for a topology name that does not exist (a matrix is checked once P is known)."""
    if isinstance(spec, str) and spec not in BUILTIN_TOPOLOGIES:
        raise ValueError(f"topology must be one of {BUILTIN_TOPOLOGIES} or a P x P matrix, got {spec!r}.")


def spectral_gap_rho(matrix: Tensor) -> float:
    """ρ = max(|λ_2|, |λ_P|) of a symmetric doubly stochastic matrix: how much one gossip step shrinks the workers'
    disagreement (D-PSGD's and D²'s analyses need ρ < 1; with ρ = 1 the workers never reach consensus)."""
    eigenvalues = torch.linalg.eigvalsh(matrix.double())  # ascending; the largest is 1
    return float(eigenvalues[:-1].abs().max()) if eigenvalues.numel() > 1 else 0.0


def check_mixing_matrix(spec: Any, world_size: int) -> Tensor:
    """Validate a user-given mixing matrix for D-PSGD and D² (Lian et al. 2017, Assumption 1; Tang et al. 2018):
    P x P, finite, non-negative, symmetric, doubly stochastic, connected, and ρ = max(|λ_2|, |λ_P|) < 1."""
    try:
        matrix = torch.as_tensor(spec, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"topology must be 'ring', 'exponential' or a P x P matrix of numbers: {error}") from error
    if matrix.shape != (world_size, world_size):
        raise ValueError(
            f"the mixing matrix must be {world_size} x {world_size} (one row per worker), got shape "
            f"{tuple(matrix.shape)}."
        )
    if not bool(torch.isfinite(matrix).all()) or bool((matrix < 0).any()):
        raise ValueError("the mixing matrix must have finite, non-negative entries.")
    rows, columns = matrix.sum(dim=1), matrix.sum(dim=0)
    if not (torch.allclose(rows, torch.ones_like(rows), atol=_TOLERANCE)):
        raise ValueError(f"every row of the mixing matrix must sum to 1 (a weighted average), got {rows.tolist()}.")
    if not (torch.allclose(columns, torch.ones_like(columns), atol=_TOLERANCE)):
        raise ValueError(
            "every column of the mixing matrix must sum to 1 (doubly stochastic, so gossip keeps the workers' "
            f"average), got {columns.tolist()}."
        )
    if not torch.allclose(matrix, matrix.T, atol=_TOLERANCE):
        raise ValueError(
            "the mixing matrix must be symmetric (W = W^T), as D-PSGD's and D²'s analyses assume; a one-way "
            "matrix such as a cyclic shift is not (topology='exponential' is the supported time-varying one)."
        )
    unreached = _unreached_from_zero(matrix)
    if unreached:
        raise ValueError(
            f"the mixing matrix's graph is not connected: workers {unreached} never exchange weights with worker 0, "
            "so the workers can never agree."
        )
    rho = spectral_gap_rho(matrix)
    if rho >= 1 - _TOLERANCE:
        raise ValueError(
            f"the mixing matrix has rho = max(|lambda_2|, |lambda_P|) = {rho:.6f}, but gossip reaches consensus only "
            "with rho < 1 (e.g. a cycle without self-weights on an even number of workers has lambda_P = -1 and "
            "only swaps the workers' weights). Give every worker a positive self-weight, or use lazy=True."
        )
    return matrix


def _unreached_from_zero(matrix: Tensor) -> list[int]:
    linked = (matrix + matrix.T) > 0
    seen, frontier = {0}, [0]
    while frontier:
        node = frontier.pop()
        for other in torch.nonzero(linked[node]).flatten().tolist():
            if other not in seen:
                seen.add(other)
                frontier.append(other)
    return [i for i in range(matrix.shape[0]) if i not in seen]


def exchange(
    meter: CommMeter,
    device: torch.device,
    sends: Sequence[tuple[int, Tensor]],
    receives: Sequence[tuple[int, Tensor]],
    tag: int = 0,
) -> None:
    """Send and receive point-to-point, all posted at once (``batch_isend_irecv``), then wait for all of them.

    Every send is counted in ``meter`` (a received buffer is counted by its sender). Posting everything before
    waiting means two workers that send to each other never wait on each other.
    """
    ops = [dist.P2POp(dist.isend, tensor, peer, tag=tag) for peer, tensor in sends]
    ops += [dist.P2POp(dist.irecv, tensor, peer, tag=tag) for peer, tensor in receives]
    if not ops:
        return
    for _, tensor in sends:
        meter.count(payload_bytes(tensor))
    with meter.timed(device):
        for work in dist.batch_isend_irecv(ops):
            work.wait()


def gossip(plan: MixingPlan, flat: Tensor, meter: CommMeter, device: torch.device, tag: int = 0) -> Tensor:
    """``sum_j W[i, j] x_j`` for this worker's flat tensor ``flat`` (its neighbours call this at the same time)."""
    received = [(source, torch.empty_like(flat)) for source, _ in plan.receive_from]
    exchange(meter, device, [(target, flat) for target in plan.send_to], received, tag=tag)
    weighted = [(weight, to_master(tensor)) for (_, weight), (_, tensor) in zip(plan.receive_from, received)]
    return gossip_mix(to_master(flat), plan.self_weight, weighted)  # in float32 for a half-precision model
