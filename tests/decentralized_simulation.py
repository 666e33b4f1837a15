"""Reference simulation of D-PSGD, D², AD-PSGD and Signum: P workers in one process, plain tensor math.

Each worker is a ``Net`` copy starting from rank 0's initial weights, reading the batches Lightning's shuffled
``DistributedSampler`` gives its rank. The update rules are written out from the papers with explicit gradients and
momentum buffers (no torch optimizer, nothing from the package), so they check the strategies independently.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch
from torch import Tensor

from tests import models
from tests.decentralized_scenarios import SEED

State = dict[str, Tensor]


def start_state() -> State:
    """Rank 0's initial weights (every rank seeds with SEED; only rank 0's weights are left unperturbed)."""
    torch.manual_seed(SEED)
    return {k: v.clone() for k, v in models.Regressor().net.state_dict().items()}


class SimWorker:
    """One worker: its net (parameters and buffers) and its position in its data shard."""

    def __init__(self, rank: int, world_size: int, state: State) -> None:
        self.rank, self.world_size, self.batches = rank, world_size, 0
        self.net = models.Net()
        self.net.load_state_dict(state)
        self.data = models.dataset(models.N_TRAIN, 0, world_size)

    def _batch(self) -> tuple[Tensor, Tensor]:
        per_epoch = models.N_TRAIN // self.world_size // models.BATCH
        epoch, index = divmod(self.batches, per_epoch)
        self.batches += 1
        order = torch.randperm(models.N_TRAIN, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()
        shard = order[self.rank :: self.world_size][index * models.BATCH : (index + 1) * models.BATCH]
        return self.data[0][shard], self.data[1][shard]

    def gradients(self) -> dict[str, Tensor]:
        """Loss gradients at the current parameters on the next batch (the forward pass updates the buffers)."""
        self.net.zero_grad()
        self.net.loss(*self._batch(), train=True).backward()
        return {name: p.grad.detach().clone() for name, p in self.net.named_parameters()}

    def params(self) -> State:
        return {name: p.detach().clone() for name, p in self.net.named_parameters()}

    def float_buffers(self) -> State:
        return {name: b.detach().clone() for name, b in self.net.named_buffers() if b.is_floating_point()}

    def state(self) -> State:
        return {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    @torch.no_grad()
    def load(self, values: State) -> None:
        state = self.net.state_dict()
        for key, value in values.items():
            state[key].copy_(value)


def make_workers(world_size: int) -> list[SimWorker]:
    state = start_state()
    return [SimWorker(rank, world_size, state) for rank in range(world_size)]


def mix(matrix: Tensor, values: list[State], rank: int) -> State:
    """sum_j W[rank, j] values_j."""
    return {
        key: sum(float(matrix[rank, j]) * values[j][key] for j in range(len(values)) if matrix[rank, j] > 0)
        for key in values[0]
    }


def ring(world_size: int, lazy: bool = False) -> Tensor:
    w = torch.zeros(world_size, world_size, dtype=torch.float64)
    for i in range(world_size):
        for j in (i - 1, i, i + 1):
            w[i, j % world_size] = 1 / 3
    return (w + torch.eye(world_size, dtype=torch.float64)) / 2 if lazy else w


def one_peer_exponential(world_size: int, step: int) -> Tensor:
    """x_i <- (x_i + x_{i - 2^k}) / 2 with k = (step - 1) mod log2(P) (P a power of two here)."""
    offset = 2 ** ((step - 1) % int(math.log2(world_size)))
    w = torch.eye(world_size, dtype=torch.float64) / 2
    for i in range(world_size):
        w[i, (i - offset) % world_size] += 0.5
    return w


def average_state(workers: list[SimWorker]) -> State:
    """Floating-point entries averaged over the workers; integer buffers from worker 0 (all equal here)."""
    states = [w.state() for w in workers]
    return {k: (sum(s[k] for s in states) / len(states)) if v.is_floating_point() else v for k, v in states[0].items()}


def val_loss(state: State, world_size: int) -> float:
    x, y = models.dataset(models.N_VAL, 1, world_size)
    net = models.Net()
    net.load_state_dict(state)
    with torch.no_grad():
        return float(net.loss(x, y, train=False))


# ----------------------------------------------------------------------------------------------------------------
# D-PSGD with local momentum: x_i <- sum_j W_ij x_j - lr * u_i, u_i = mu * u_i + (g_i + wd * x_i)
# ----------------------------------------------------------------------------------------------------------------
def dpsgd(
    world_size: int,
    steps: int,
    matrix_at: Callable[[int], Tensor],
    momentum: float = models.MOMENTUM,
    on_step: Callable[[int, list[SimWorker]], None] | None = None,
) -> tuple[list[SimWorker], list[State]]:
    workers = make_workers(world_size)
    buffers: list[State] = [{} for _ in workers]
    for step in range(1, steps + 1):
        before = [w.params() for w in workers]
        grads = [w.gradients() for w in workers]  # at the pre-averaging weights
        matrix = matrix_at(step)
        float_buffers = [w.float_buffers() for w in workers]
        new_states = []
        for i in range(world_size):
            mixed = mix(matrix, before, i)
            for name, g in grads[i].items():
                direction = g + models.WEIGHT_DECAY * before[i][name]
                buffers[i][name] = direction if name not in buffers[i] else momentum * buffers[i][name] + direction
                mixed[name] = mixed[name] - models.LR * buffers[i][name]
            new_states.append({**mixed, **mix(matrix, float_buffers, i)})
        for worker, state in zip(workers, new_states):
            worker.load(state)
        if on_step:
            on_step(step, workers)
    return workers, buffers


# ----------------------------------------------------------------------------------------------------------------
# D²: X_1 = W (X_0 - lr G_0); X_{t+1} = W (2 X_t - X_{t-1} - lr G_t + lr G_{t-1}); G includes weight decay
# ----------------------------------------------------------------------------------------------------------------
def d2(world_size: int, steps: int, matrix: Tensor) -> list[SimWorker]:
    workers = make_workers(world_size)
    previous_x: list[State] = []
    previous_g: list[State] = []
    for step in range(steps):
        x = [w.params() for w in workers]
        raw = [w.gradients() for w in workers]
        g = [{k: raw[i][k] + models.WEIGHT_DECAY * x[i][k] for k in raw[i]} for i in range(world_size)]
        if step == 0:
            bracket = [{k: x[i][k] - models.LR * g[i][k] for k in x[i]} for i in range(world_size)]
        else:
            bracket = [
                {k: 2 * x[i][k] - previous_x[i][k] - models.LR * g[i][k] + models.LR * previous_g[i][k] for k in x[i]}
                for i in range(world_size)
            ]
        float_buffers = [w.float_buffers() for w in workers]
        new_states = [{**mix(matrix, bracket, i), **mix(matrix, float_buffers, i)} for i in range(world_size)]
        for worker, state in zip(workers, new_states):
            worker.load(state)
        previous_x, previous_g = x, g
    return workers


# ----------------------------------------------------------------------------------------------------------------
# AD-PSGD: actives (even ranks) pick a random passive neighbour; a passive serves its actives in rank order
# ----------------------------------------------------------------------------------------------------------------
def adpsgd_pairs(step: int, world_size: int, seed: int) -> dict[int, int]:
    """The documented schedule, ring topology: random.Random(f"adpsgd:{seed}:{step}") draws for actives 0, 2, ..."""
    rng = random.Random(f"adpsgd:{seed}:{step}")
    return {a: sorted({(a - 1) % world_size, (a + 1) % world_size})[rng.randrange(2)] for a in range(0, world_size, 2)}


def adpsgd(world_size: int, steps: int, seed: int) -> tuple[list[SimWorker], list[dict[int, int]]]:
    workers = make_workers(world_size)
    buffers: list[State] = [{} for _ in workers]
    schedule = []
    for step in range(1, steps + 1):
        before = [w.params() for w in workers]
        grads = [w.gradients() for w in workers]
        current = [{**before[i], **workers[i].float_buffers()} for i in range(world_size)]
        pairs = adpsgd_pairs(step, world_size, seed)
        schedule.append(pairs)
        for passive in range(1, world_size, 2):
            for active in sorted(a for a, p in pairs.items() if p == passive):  # atomic averages, in rank order
                averaged = {k: (current[active][k] + current[passive][k]) / 2 for k in current[active]}
                current[active], current[passive] = averaged, dict(averaged)
        for i, worker in enumerate(workers):
            for name, g in grads[i].items():
                direction = g + models.WEIGHT_DECAY * before[i][name]
                buffers[i][name] = (
                    direction if name not in buffers[i] else models.MOMENTUM * buffers[i][name] + direction
                )
                current[i][name] = current[i][name] - models.LR * buffers[i][name]
            worker.load(current[i])
    return workers, schedule


# ----------------------------------------------------------------------------------------------------------------
# Signum with majority vote: m_i = beta m_i + (1 - beta) g_i; x <- x - lr (sign(sum_i sign(m_i)) + wd x)
# ----------------------------------------------------------------------------------------------------------------
def signum(
    world_size: int, steps: int, lr: float, beta: float = models.MOMENTUM
) -> tuple[list[SimWorker], list[State]]:
    workers = make_workers(world_size)
    momenta = [{k: torch.zeros_like(v) for k, v in workers[0].params().items()} for _ in workers]
    for _ in range(steps):
        x = workers[0].params()  # identical on every worker
        for worker, m in zip(workers, momenta):
            for name, g in worker.gradients().items():
                m[name] = beta * m[name] + (1 - beta) * g
        for name in x:
            votes = sum(torch.where(m[name] >= 0, 1.0, -1.0) for m in momenta)
            x[name] = x[name] - lr * (torch.sign(votes) + models.WEIGHT_DECAY * x[name])
        for worker in workers:
            worker.load(x)
    return workers, momenta


# ----------------------------------------------------------------------------------------------------------------
# AD-PSGD's asynchronous schedule, replayed from the recorded exchanges
# ----------------------------------------------------------------------------------------------------------------
# One exchange as the strategy records it: (active, active's step, passive, passive's step, passive's serve number,
# taken between two of the passive's steps). Algorithm 1 of Lian et al. (2018) for each worker i: read x̂_i and take
# the gradient there; average atomically x_i, x_j <- (x_i + x_j) / 2 with a neighbour; x_i <- x_i - lr * g(x̂_i).
Record = tuple[int, int, int, int, int, bool]


def _sgd_step(worker: SimWorker, buffer: State) -> tuple[State, State]:
    """The gradient at the worker's current weights (x̂) and its local SGD-with-momentum step -lr * u; returns
    (what the worker sends in an average taken during this step: x̂ and the buffers after the forward pass, step)."""
    x_hat = worker.params()
    grads = worker.gradients()
    step = {}
    for name, g in grads.items():
        direction = g + models.WEIGHT_DECAY * x_hat[name]
        buffer[name] = direction if name not in buffer else models.MOMENTUM * buffer[name] + direction
        step[name] = -models.LR * buffer[name]
    return {**x_hat, **worker.float_buffers()}, step


def _plus(values: State, step: State) -> State:
    return {k: v + step[k] if k in step else v for k, v in values.items()}


def _average(mine: State, theirs: State) -> State:
    return {k: (mine[k] + theirs[k]) / 2 for k in mine}


def adpsgd_replay(
    world_size: int,
    steps: int,
    records: list[Record],
    workers: list[SimWorker] | None = None,
    buffers: list[State] | None = None,
    done: int = 0,
) -> tuple[list[SimWorker], list[State]]:
    """Replay Algorithm 1 with the recorded pairs: each worker takes steps ``done + 1 .. steps``; an active's
    average in its step k uses its x̂ and the passive's current value; a passive serves its averages in the recorded
    order, those inside its step s with its x̂ (its step added afterwards), those between steps with its weights as
    they are. Runs the workers as coroutines: an average happens once both sides have reached it."""
    workers = workers or make_workers(world_size)
    buffers = buffers if buffers is not None else [{} for _ in workers]
    by_active = {(r[0], r[1]): r for r in records}
    served = {p: sorted((r for r in records if r[2] == p), key=lambda r: r[4]) for p in range(1, world_size, 2)}
    offered: dict[tuple[int, int], State] = {}  # (active, step) -> its x̂ for that step's average
    answered: dict[tuple[int, int], State] = {}  # (active, step) -> the average

    def active(rank: int):  # type: ignore[no-untyped-def]
        worker = workers[rank]
        for k in range(done + 1, steps + 1):
            payload, step = _sgd_step(worker, buffers[rank])
            if (rank, k) in by_active:
                offered[(rank, k)] = payload
                while (rank, k) not in answered:
                    yield
                payload = answered.pop((rank, k))
            worker.load(_plus(payload, step))

    def passive(rank: int):  # type: ignore[no-untyped-def]
        worker, queue = workers[rank], served[rank]

        def serve(current: State, s: int, between: bool):  # type: ignore[no-untyped-def]
            while queue and queue[0][3] == s and queue[0][5] == between:
                key = (queue[0][0], queue[0][1])
                while key not in offered:
                    yield
                current = _average(current, offered.pop(key))
                answered[key] = current
                queue.pop(0)
            return current

        for s in range(done, steps + 1):
            if s > done:
                payload, step = _sgd_step(worker, buffers[rank])
                worker.load(_plus((yield from serve(payload, s, between=False)), step))
            worker.load((yield from serve({**worker.params(), **worker.float_buffers()}, s, between=True)))
        assert not queue, f"rank {rank}: averages left over {queue}"

    running = [active(r) if r % 2 == 0 else passive(r) for r in range(world_size)]
    while running:
        before = sum(w.batches for w in workers), len(offered), len(answered), sum(map(len, served.values()))
        for coroutine in list(running):
            try:
                next(coroutine)
            except StopIteration:
                running.remove(coroutine)
        after = sum(w.batches for w in workers), len(offered), len(answered), sum(map(len, served.values()))
        if running and after == before:  # every worker waits for another: not an order the job could have run
            raise AssertionError(f"the recorded exchanges cannot be replayed (a cycle of waits): {records}")
    assert not offered and not answered, "an average was offered or answered but never taken"
    return workers, buffers
