"""Reference simulation of DiLoCo and Streaming DiLoCo: the rules replayed in one process, independent of the package.

The P workers are ``tests.simulation`` workers (own SGD optimizer, own data shard, rank 0's initial weights). The outer
optimizer is Nesterov SGD written out by hand (PyTorch's form, which the papers use: b ← μ b + Δ, θ ← θ − lr (Δ + μ b)),
the 8/4-bit codec is a few lines of blockwise absmax rounding, and the schedule is Douillard et al.'s:

- DiLoCo (arXiv:2311.08105, Algorithm 1): after every ``tau``-th step Δ = θ − mean_i θ_i, θ ← OuterOpt(θ, Δ) on
  parameters, θ ← mean_i θ_i on floating buffers, every θ_i ← θ.
- Streaming DiLoCo (arXiv:2501.18512, Algorithm 2): fragment f's pseudo-gradients leave after steps t ≡ f·tau/F (mod
  tau), quantized; after step t + k its outer step lands and every worker mixes θ_{i,f} ← α θ_{i,f} + (1 − α) θ_f.
  Fragments still in flight when training ends land then.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from tests import simulation as sim


def floating_names(net: torch.nn.Module) -> list[str]:
    """Parameters, then floating buffers: the order the strategy lays the model out in."""
    return [n for n, _ in net.named_parameters()] + [n for n, b in net.named_buffers() if b.is_floating_point()]


@dataclass
class NesterovSGD:
    """The outer optimizer on a dict of parameter tensors (buffers are averaged, never stepped)."""

    lr: float
    momentum: float
    buffers: dict[str, Tensor] = field(default_factory=dict)

    def step(self, theta: dict[str, Tensor], delta: dict[str, Tensor], parameters: set[str]) -> None:
        for key in theta:
            if key not in parameters:
                theta[key] = theta[key] - delta[key]  # the workers' average
                continue
            b = self.buffers.get(key)
            b = delta[key].clone() if b is None else self.momentum * b + delta[key]
            self.buffers[key] = b
            theta[key] = theta[key] - self.lr * (delta[key] + self.momentum * b)


def fake_quantize(x: Tensor, bits: int, block: int) -> Tensor:
    """What a payload decodes to: each block of ``block`` values rounded to multiples of max|x| / (2^(bits-1) - 1)."""
    levels = 2 ** (bits - 1) - 1
    out = torch.zeros_like(x)
    for start in range(0, x.numel(), block):
        chunk = x[start : start + block]
        scale = chunk.abs().max() / levels
        if scale > 0:
            out[start : start + block] = torch.round(chunk / scale).clamp(-levels, levels) * scale
    return out


def diloco(
    world_size: int,
    steps: int,
    tau: int,
    lr: float,
    momentum: float,
    val_every: int | None = None,
    poison: tuple[int, int] | None = None,
) -> dict:
    """Workers, θ and the validation losses of θ (every ``val_every`` steps) after ``steps`` steps.

    ``poison=(rank, step)``: that rank's weights become NaN before that (1-based) step; at the next round a diverged
    worker (non-finite loss in its last 10 or weights) is left out of the average and reset to θ with fresh optimizer
    state and no losses."""
    workers = sim.make_workers(world_size)
    names = floating_names(workers[0].net)
    parameters = {n for n, _ in workers[0].net.named_parameters()}
    theta = {n: workers[0].net.state_dict()[n].clone() for n in names}
    outer = NesterovSGD(lr, momentum)
    vals = []
    for step in range(1, steps + 1):
        for rank, worker in enumerate(workers):
            sim.local_step(worker, poison=(rank, step) == poison)
        if step % tau == 0:
            with torch.no_grad():
                diverged = [w.diverged(10) for w in workers]
                states = [w.net.state_dict() for w, bad in zip(workers, diverged) if not bad]
                delta = {n: theta[n] - sum(s[n] for s in states) / len(states) for n in names}
                outer.step(theta, delta, parameters)
                for worker, bad in zip(workers, diverged):
                    if bad:
                        worker.reset_to({**worker.net.state_dict(), **theta})
                    else:
                        worker.net.load_state_dict({**worker.net.state_dict(), **theta})
        if val_every and step % val_every == 0:
            vals.append(sim.val_loss({**workers[0].net.state_dict(), **theta}, world_size))
    return {"workers": workers, "theta": theta, "vals": vals}


def split(names: list[str], sizes: dict[str, int], count: int) -> list[list[str]]:
    """Contiguous groups of tensors, group f closing at the first tensor where the running size reaches (f+1)/count
    of the total (the paper's fragments are balanced by size too)."""
    total, groups, current, seen = sum(sizes.values()), [], [], 0
    for index, name in enumerate(names):
        current.append(name)
        seen += sizes[name]
        closing = seen * count >= (len(groups) + 1) * total or len(names) - index - 1 == count - len(groups) - 1
        if len(groups) < count - 1 and closing:
            groups.append(current)
            current = []
    return [*groups, current]


def streaming(
    world_size: int,
    steps: int,
    tau: int,
    fragments: int,
    overlap: int,
    alpha: float,
    bits: int,
    block: int,
    lr: float,
    momentum: float,
    val_every: int | None = None,
    poison: tuple[int, int] | None = None,
) -> dict:
    """Workers, θ and the validation losses of θ (every ``val_every`` steps) after ``steps`` steps of Streaming
    DiLoCo (the fragments in flight at the end landed).

    ``poison=(rank, step)`` as for :func:`diloco`: a worker diverged when its fragment leaves sends nothing usable,
    is left out of that fragment's average, and is reset to the whole of θ when the fragment lands."""
    workers = sim.make_workers(world_size)
    names = floating_names(workers[0].net)
    parameters = {n for n, _ in workers[0].net.named_parameters()}
    init = workers[0].net.state_dict()
    groups = split(names, {n: init[n].numel() for n in names}, fragments)
    theta = {n: init[n].clone() for n in names}
    outers = [NesterovSGD(lr, momentum) for _ in groups]
    in_flight: list[tuple[int, int, Tensor, list[bool]]] = []  # fragment, due step, mean, who was left out
    vals = []

    def flat(state: dict[str, Tensor], group: list[str]) -> Tensor:
        return torch.cat([state[n].reshape(-1) for n in group])

    @torch.no_grad()
    def land(f: int, mean: Tensor, left_out: list[bool]) -> None:
        group = groups[f]
        chunks = dict(zip(group, mean.split([theta[n].numel() for n in group])))
        delta = {n: chunks[n].view_as(theta[n]) for n in group}
        part = {n: theta[n] for n in group}
        outers[f].step(part, delta, parameters)
        theta.update(part)
        for worker, bad in zip(workers, left_out):
            state = worker.net.state_dict()
            if bad:
                worker.reset_to({**state, **theta})
            else:
                worker.net.load_state_dict({**state, **{n: alpha * state[n] + (1 - alpha) * theta[n] for n in group}})

    for step in range(1, steps + 1):
        for rank, worker in enumerate(workers):
            sim.local_step(worker, poison=(rank, step) == poison)
        for f in range(fragments):
            if step % tau == f * tau // fragments:
                left_out = [w.diverged(10) for w in workers]
                decoded = [
                    fake_quantize(flat(theta, groups[f]) - flat(w.net.state_dict(), groups[f]).detach(), bits, block)
                    for w, bad in zip(workers, left_out)
                    if not bad
                ]
                in_flight.append((f, step + overlap, sum(decoded[1:], decoded[0]) / len(decoded), left_out))
        for item in [item for item in in_flight if item[1] <= step]:
            in_flight.remove(item)
            land(item[0], item[2], item[3])
        if val_every and step % val_every == 0:
            vals.append(sim.val_loss({**workers[0].net.state_dict(), **theta}, world_size))
    for f, _, mean, left_out in in_flight:
        land(f, mean, left_out)
    return {"workers": workers, "theta": theta, "groups": groups, "vals": vals}
