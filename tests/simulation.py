"""Reference simulation: the update rules replayed in one process with plain PyTorch, independent of the package.

All P workers live here as separate ``Net`` copies, each with its own SGD optimizer and its own data shard (the
indices that Lightning's shuffled ``DistributedSampler`` gives it each epoch), starting from rank 0's initial
weights. The rules are written out from the papers (see each function), not from the strategy code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tests import models
from tests.scenarios import SEED


def initial_net(with_buffers: bool = True) -> models.Net:
    """Rank 0's initial weights: every rank seeds with SEED, and ranks other than 0 then perturb theirs."""
    torch.manual_seed(SEED)
    return models.Regressor(with_buffers).net


def shard_indices(rank: int, world_size: int, epoch: int) -> list[int]:
    """DistributedSampler's shard: a permutation seeded with seed + epoch, then every world_size-th index.

    Lightning always shuffles the training sampler of a distributed run and seeds it with the global seed.
    """
    generator = torch.Generator().manual_seed(SEED + epoch)
    order = torch.randperm(models.N_TRAIN, generator=generator).tolist()
    return order[rank::world_size]


@dataclass
class Worker:
    net: models.Net
    optimizer: torch.optim.Optimizer
    rank: int
    world_size: int
    losses: list[float] = field(default_factory=list)
    cursor: int = 0
    eamsgd: Momentum | None = None  # set by :func:`use_eamsgd`: the worker steps EAMSGD, the net holds x + δv

    def next_batch(self) -> tuple[Tensor, Tensor]:
        per_epoch = models.N_TRAIN // self.world_size // models.BATCH
        epoch, index = divmod(self.cursor, per_epoch)
        shard = shard_indices(self.rank, self.world_size, epoch)[index * models.BATCH : (index + 1) * models.BATCH]
        self.cursor += 1
        x, y = models.dataset(models.N_TRAIN, 0, self.world_size)
        return x[shard], y[shard]

    def score(self, window: int) -> float:
        """Mean of the last ``window`` reported losses; +inf if none or not finite."""
        recent = self.losses[-window:]
        if not recent:
            return math.inf
        value = float(torch.tensor(recent, dtype=torch.float32).mean())
        return value if math.isfinite(value) else math.inf

    def diverged(self, window: int) -> bool:
        """A recent reported loss or a floating-point weight is non-finite."""
        recent = self.losses[-window:]
        weights = [v for v in self.net.state_dict().values() if v.is_floating_point()]
        return any(not math.isfinite(x) for x in recent) or any(not bool(torch.isfinite(v).all()) for v in weights)

    def reset_to(self, state: dict[str, Tensor]) -> None:
        """Recovery of a diverged worker: the given weights, fresh optimizer state, no recorded losses."""
        self.net.load_state_dict(state)
        self.optimizer.state.clear()
        self.losses.clear()
        if self.eamsgd is not None:
            self.eamsgd = Momentum.at(self.net)

    def float_state(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.net.state_dict().items() if v.is_floating_point()}

    def elastic_state(self) -> dict[str, Tensor]:
        """What EASGD's elastic force acts on: the floating-point weights the net holds, or under EAMSGD the
        paper's x in place of the parameters (the net holds the look-ahead x + δv)."""
        floats = self.float_state()
        return floats if self.eamsgd is None else {**floats, **self.eamsgd.x}


@dataclass
class Momentum:
    """EAMSGD's state of one worker (Zhang et al. 2015, Sec. 3.2): x and the velocity v, per parameter."""

    x: dict[str, Tensor]
    v: dict[str, Tensor]

    @staticmethod
    def at(net: models.Net) -> Momentum:
        x = {k: p.detach().clone() for k, p in net.named_parameters()}
        return Momentum(x, {k: torch.zeros_like(p) for k, p in x.items()})


def use_eamsgd(workers: list[Worker]) -> None:
    """Let the workers step EAMSGD (from their current weights, v = 0) instead of their SGD optimizer."""
    for worker in workers:
        worker.eamsgd = Momentum.at(worker.net)


def make_workers(world_size: int, with_buffers: bool = True) -> list[Worker]:
    init = initial_net(with_buffers).state_dict()
    workers = []
    for rank in range(world_size):
        net = models.Net(with_buffers)
        net.load_state_dict(init)
        workers.append(Worker(net, models.make_optimizer(net.parameters()), rank, world_size))
    return workers


def local_step(worker: Worker, nan_report: bool = False, micro_batches: int = 1, poison: bool = False) -> None:
    """One optimizer step of plain SGD; with ``micro_batches`` > 1, gradients of loss / k are accumulated.

    ``poison`` sets the first layer's weights to NaN first (like ``models.DivergingRegressor``). A worker under
    :func:`use_eamsgd` takes EAMSGD's step instead (:func:`eamsgd_step`)."""
    if worker.eamsgd is not None:
        assert not (nan_report or poison or micro_batches > 1), "not simulated under EAMSGD"
        eamsgd_step(worker)
        return
    if poison:
        with torch.no_grad():
            worker.net.body[0].weight.fill_(math.nan)
    worker.optimizer.zero_grad()
    for _ in range(micro_batches):
        loss = worker.net.loss(*worker.next_batch(), train=True)
        (loss / micro_batches).backward()
        worker.losses.append(math.nan if nan_report else float(loss.detach()))
    worker.optimizer.step()


@torch.no_grad()
def eamsgd_step(worker: Worker) -> None:
    """EAMSGD's local step, Zhang et al. 2015 eq. 7 without the elastic term (applied by the rounds), with the
    optimizer's lr η, momentum δ and weight decay λ (the gradient of λ/2 ||y||², as in the authors' code)::

        v <- δ v - η (∇f(y) + λ y),   y = x + δ v (the weights the net holds)
        x <- x + v;  the net then holds the new look-ahead x + δ v
    """
    state = worker.eamsgd
    assert state is not None
    worker.optimizer.zero_grad()
    with torch.enable_grad():
        loss = worker.net.loss(*worker.next_batch(), train=True)
        loss.backward()
    worker.losses.append(float(loss.detach()))
    (group,) = worker.optimizer.param_groups
    lr, delta, decay = group["lr"], group["momentum"], group["weight_decay"]
    for name, y in worker.net.named_parameters():
        assert y.grad is not None
        state.v[name] = delta * state.v[name] - lr * (y.grad + decay * y)
        state.x[name] = state.x[name] + state.v[name]
        y.copy_(state.x[name] + delta * state.v[name])


def set_elastic(worker: Worker, key: str, value: Tensor) -> None:
    """Write the result of an elastic move: x under EAMSGD (the net's look-ahead moves at the next step), else the
    net's weight."""
    if worker.eamsgd is not None and key in worker.eamsgd.x:
        worker.eamsgd.x[key] = value.clone()
    else:
        worker.net.state_dict()[key].copy_(value)


def elect(workers: list[Worker], window: int) -> tuple[int | None, list[float]]:
    """Lowest finite score, ties to the lowest rank; a diverged worker's score is NaN (never elected)."""
    scores = [math.nan if w.diverged(window) else w.score(window) for w in workers]
    finite = [(s, r) for r, s in enumerate(scores) if math.isfinite(s)]
    return (min(finite)[1] if finite else None), scores


@torch.no_grad()
def lsgd_round(workers: list[Worker], pull: float, window: int) -> dict[str, float] | None:
    """Leader SGD: x <- x - pull * (x - x_leader) for every non-leader; integer buffers copied from the leader."""
    leader, scores = elect(workers, window)
    if leader is None:
        return None
    leader_state = {k: v.clone() for k, v in workers[leader].net.state_dict().items()}
    distances = []
    for rank, worker in enumerate(workers):
        if math.isnan(scores[rank]):  # diverged: reset to the leader
            worker.reset_to(leader_state)
            distances.append(math.nan)
            continue
        squared = 0.0
        for key, value in worker.net.state_dict().items():
            target = leader_state[key]
            if rank == leader:
                continue
            if value.is_floating_point():
                squared += float(((value.double() - target.double()) ** 2).sum())
                value.copy_(value - pull * (value - target))
            else:
                value.copy_(target)
        distances.append(math.sqrt(squared))
    return {"leader": leader, "leader_score": scores[leader], "distances": distances}


@torch.no_grad()
def multi_leader_round(
    workers: list[Worker], groups: list[list[int]], local_pull: float, global_pull: float, window: int, both: bool
) -> dict[str, object]:
    """Multi-leader LSGD from the pre-round weights:
    x <- x - local_pull (x - x_local_leader) [- global_pull (x - x_global_leader) when both rounds are due]."""
    _, scores = elect(workers, window)
    diverged = [math.isnan(s) for s in scores]
    local = {}
    for group in groups:
        finite = [(scores[r], r) for r in group if math.isfinite(scores[r])]
        for r in group:
            local[r] = min(finite)[1] if finite else None
    global_leader = elect(workers, window)[0] if both else None
    before = [{k: v.clone() for k, v in w.net.state_dict().items()} for w in workers]
    for rank, worker in enumerate(workers):
        if diverged[rank]:
            source = global_leader if global_leader is not None else local[rank]
            if source is not None:
                worker.reset_to(before[source])
            continue
        for key, value in worker.net.state_dict().items():
            x = before[rank][key]
            if value.is_floating_point():
                new = x.clone()
                if local[rank] is not None:
                    new = new - local_pull * (x - before[local[rank]][key])
                if global_leader is not None:
                    new = new - global_pull * (x - before[global_leader][key])
                value.copy_(new)
            else:
                source = global_leader if global_leader is not None else local[rank]
                value.copy_(before[source][key])
    return {"local": local, "global": global_leader}


@torch.no_grad()
def easgd_round(workers: list[Worker], center: dict[str, Tensor], alpha: float, window: int = 10) -> None:
    """EASGD: x_i <- x_i - alpha (x_i - c); c <- c + alpha * sum_i (x_i - c), all from pre-round values (under
    EAMSGD x_i is the paper's x, not the look-ahead the net holds: :meth:`Worker.elastic_state`).

    Diverged workers (non-finite loss or weights) are left out of the sum and then reset to the new center.
    """
    diverged = [w.diverged(window) for w in workers]
    states = [w.elastic_state() for w in workers]
    for key, c in center.items():
        old = [s[key].clone() for s in states]
        for worker, x, bad in zip(workers, old, diverged):
            if not bad:
                set_elastic(worker, key, x - alpha * (x - c))
        c.copy_(c + alpha * sum(x - c for x, bad in zip(old, diverged) if not bad))
    for worker, bad in zip(workers, diverged):
        if bad:
            worker.reset_to({**worker.net.state_dict(), **{k: v.clone() for k, v in center.items()}})


@torch.no_grad()
def val_loss(net_state: dict[str, Tensor], world_size: int, shard_of: int | None = None) -> float:
    """MSE of a model on the validation set (or on one rank's validation shard)."""
    x, y = models.dataset(models.N_VAL, 1, world_size)
    if shard_of is not None:
        x, y = x[shard_of::world_size], y[shard_of::world_size]
    net = models.Net()
    net.load_state_dict(net_state)
    return float(net.loss(x, y, train=False))


def states(workers: list[Worker]) -> list[dict[str, Tensor]]:
    return [{k: v.clone() for k, v in w.net.state_dict().items()} for w in workers]
