"""Reference replay of the asynchronous strategies in one process, independent of the package.

An asynchronous run is deterministic once the order of its board transactions is known: between two of its rounds
a worker only trains locally on its own shard, which depends on nothing else. The multi-process run records, for
every round, the worker, its step and the board's transaction number; :func:`replay` applies the same rounds in
the same order to P simulated workers (``tests/simulation.py``: same model, shards and seed), with the update rules
written out from the papers:

- asynchronous LSGD, the package's ``variant="board"``: a worker whose score beats the board's leader (or that is
  the leader) publishes its weights as the leader's copy; every other worker pulls x <- x - pull (x - copy);
- asynchronous EASGD (Zhang et al. 2015, Algorithm 1): delta = alpha (x - c); x <- x - delta; c <- c + delta;
- DOWNPOUR (Dean et al. 2012, Algorithm 7.1): a worker sums its local updates since its last push (its
  "accrued" update); every ``push_every`` of its steps w <- w + s * accrued, accrued <- 0 (buffers: the pusher's);
  every ``fetch_every`` x <- w (the accrued update is kept); both due: the push first. With one period τ (s = 1):
  w <- w + (x - x_fetched); x <- w.

Asynchronous LSGD's default, the paper's Algorithm 1, has no board order: every worker joins every round, so a run
is fixed by each worker's own step count at each round (:func:`replay_algorithm1`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tests import simulation as sim


@dataclass
class Board:
    """The shared state: the leader's copy (LSGD), the center (EASGD) or the held parameters (DOWNPOUR)."""

    state: dict[str, Tensor]
    leader: int = -1
    score: float = math.inf
    accrued: list[dict[str, Tensor]] = field(default_factory=list)  # DOWNPOUR: per worker, not yet pushed
    last: list[dict[str, Tensor]] = field(default_factory=list)  # DOWNPOUR: per worker, its weights after its round
    leaders_seen: list[int] = field(default_factory=list)


def transactions(results: list[dict[str, Any]], key: str = "rounds") -> list[tuple[int, int, int]]:
    """(transaction, rank, step) of every recorded round, in the board's order."""
    # (A resumed run's recorder also notes the restored round count once, before any round: no transaction.)
    order = [
        (int(r["async/transaction"]), rank, int(r["step"]))
        for rank, res in enumerate(results)
        for r in res[key]
        if "async/transaction" in r
    ]
    return sorted(order)


def clone(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in state.items()}


def new_board(kind: str, workers: list[sim.Worker]) -> Board:
    initial = clone(workers[0].net.state_dict())
    if kind == "lsgd_async":
        return Board(initial)
    floats = {k: v for k, v in initial.items() if v.is_floating_point()}
    if kind != "downpour":
        return Board(floats)
    zeros = {k: torch.zeros_like(v) for k, v in floats.items()}
    return Board(floats, accrued=[clone(zeros) for _ in workers], last=[clone(floats) for _ in workers])


@torch.no_grad()
def apply_round(kind: str, board: Board, worker: sim.Worker, settings: dict[str, Any]) -> None:
    rank, state = worker.rank, worker.net.state_dict()
    window = settings.get("leader_window", 10)
    diverged = worker.diverged(window)
    if kind == "lsgd_async":
        score = math.nan if diverged else worker.score(window)
        if not diverged and (board.leader == rank or score < board.score):
            board.state, board.leader, board.score = clone(state), rank, score
        else:
            if diverged and board.leader == rank:
                board.score = math.inf
            if diverged:
                worker.reset_to(clone(board.state))
            else:
                pull = settings["pull_strength"]
                for key, value in state.items():
                    target = board.state[key]
                    value.copy_(value - pull * (value - target) if value.is_floating_point() else target)
        board.leaders_seen.append(board.leader)
    elif kind == "easgd_async":
        if diverged:
            worker.reset_to({**state, **clone(board.state)})
            return
        alpha, own = settings["moving_rate"], worker.elastic_state()  # under EAMSGD the paper's x, not x + δv
        for key, c in board.state.items():
            delta = alpha * (own[key] - c)
            sim.set_elastic(worker, key, own[key] - delta)
            c.copy_(c + delta)
    elif kind == "downpour":
        downpour_round(board, worker, settings, diverged)
    else:
        raise KeyError(kind)


@torch.no_grad()
def downpour_round(board: Board, worker: sim.Worker, settings: dict[str, Any], diverged: bool) -> None:
    """DOWNPOUR after the worker's step ``worker.cursor``: push and/or fetch as its periods say."""
    rank, state, step = worker.rank, worker.net.state_dict(), worker.cursor
    parameters = {name for name, _ in worker.net.named_parameters()}
    if diverged:  # reset to the held parameters; its accrued update is dropped
        worker.reset_to({**state, **clone(board.state)})
        board.accrued[rank] = {k: torch.zeros_like(v) for k, v in board.state.items()}
        board.last[rank] = clone(board.state)
        return
    scale = settings.get("push_scale", 1.0)
    scale = 1.0 / worker.world_size if scale == "1/P" else scale
    tau = settings.get("tau", 1)
    push = step % settings.get("push_every", tau) == 0
    fetch = step % settings.get("fetch_every", tau) == 0
    for key in parameters:
        board.accrued[rank][key] += state[key] - board.last[rank][key]  # the local updates since its last round
    if push:
        for key, w in board.state.items():
            w.copy_(w + scale * board.accrued[rank][key] if key in parameters else state[key])
            board.accrued[rank][key].zero_()
    if fetch:
        for key, w in board.state.items():
            state[key].copy_(w)
    board.last[rank] = {k: state[k].clone() for k in board.state}


def replay(
    kind: str,
    order: list[tuple[int, int, int]],
    settings: dict[str, Any],
    world_size: int,
    total_steps: int,
    workers: list[sim.Worker] | None = None,
    board: Board | None = None,
    poison: tuple[int, int] | None = None,
    end: bool = True,
) -> tuple[list[sim.Worker], Board]:
    """Apply the recorded rounds in board order, training each worker locally up to the round's step; then train
    every worker up to ``total_steps`` and (``end``; LSGD) hold the final election among all workers.
    ``poison=(rank, step)`` turns that worker's weights NaN before that (0-based) step, like
    ``models.DivergingRegressor``."""
    workers = workers if workers is not None else sim.make_workers(world_size)
    board = board if board is not None else new_board(kind, workers)

    def advance(worker: sim.Worker, to_step: int) -> None:
        while worker.cursor < to_step:
            sim.local_step(worker, poison=poison == (worker.rank, worker.cursor))

    for _, rank, step in order:
        advance(workers[rank], step)
        apply_round(kind, board, workers[rank], settings)
    for worker in workers:
        advance(worker, total_steps)
    if end and kind == "lsgd_async":  # the end of training: one last election among all workers, nobody pulled
        window = settings.get("leader_window", 10)
        leader, scores = sim.elect(workers, window)
        if leader is not None and leader != board.leader:
            board.state, board.leader, board.score = clone(workers[leader].net.state_dict()), leader, scores[leader]
    return workers, board


def algorithm1_rounds(
    results: list[dict[str, Any]], key: str = "history", number: str = "lsgd/round"
) -> list[list[int]]:
    """Per round of Algorithm 1, in order: every rank's own step count when it joined (from ``round_history``; with
    groups, ``number="lsgd/local_round"`` numbers every round, local or global)."""
    rounds: dict[int, dict[int, int]] = {}
    for rank, result in enumerate(results):
        for r in result[key]:
            rounds.setdefault(int(r[number]), {})[rank] = int(r["lsgd/own_steps"])
    assert all(len(steps) == len(results) for steps in rounds.values()), f"a round without every worker: {rounds}"
    return [[rounds[k][rank] for rank in range(len(results))] for k in sorted(rounds)]


def replay_algorithm1(
    rounds: list[list[int]],
    settings: dict[str, Any],
    world_size: int,
    total_steps: int,
    workers: list[sim.Worker] | None = None,
    poison: tuple[int, int] | None = None,
    final_election: bool = False,
    groups: list[list[int]] | None = None,
    first_round: int = 1,
) -> tuple[list[sim.Worker], list[dict[str, Any] | None]]:
    """Asynchronous LSGD, Teng et al. 2019, Algorithm 1: at each round every worker has trained locally up to its
    recorded step count; then the leader is elected over all workers' current scores and every other worker is
    pulled, x <- x - pull (x - x_leader) (``sim.lsgd_round``: the synchronous round, on workers at unequal steps).
    After the last round every worker trains to ``total_steps``; ``final_election`` copies the leader's weights to
    all (final_sync). Returns the workers and each round's outcome.

    With ``groups`` (the multi-leader form) ``rounds`` are the local rounds (one per P·local_tau steps of the job);
    round k (counted from ``first_round``, after a resume) is also global when k·local_tau is a multiple of tau.
    Each applies the synchronous multi-leader round on the workers at their recorded steps:
    ``settings["pull_order"]`` "sequential" (default; Algorithm 1's order, ``sim.sequential_multi_leader_round``)
    or "simultaneous" (eq. 2, ``sim.multi_leader_round``), with
    ``local_pull_strength`` toward the group's leader and ``pull_strength`` toward the global one."""
    workers = workers if workers is not None else sim.make_workers(world_size)
    window = settings.get("leader_window", 10)

    def advance(worker: sim.Worker, to_step: int) -> None:
        while worker.cursor < to_step:
            sim.local_step(worker, poison=poison == (worker.rank, worker.cursor))

    outcomes = []
    sequential = settings.get("pull_order", "sequential") == "sequential"
    multi_round = sim.sequential_multi_leader_round if sequential else sim.multi_leader_round
    for k, steps in enumerate(rounds, start=first_round):
        for worker, own in zip(workers, steps):
            advance(worker, own)
        if groups is None:
            outcomes.append(sim.lsgd_round(workers, settings["pull_strength"], window))
            continue
        both = k * settings["local_tau"] % settings["tau"] == 0
        local_pull = settings["local_pull_strength"]
        outcomes.append(multi_round(workers, groups, local_pull, settings["pull_strength"], window, both))
    for worker in workers:
        advance(worker, total_steps)
    if final_election:
        leader, _ = sim.elect(workers, window)
        assert leader is not None
        for worker in workers:
            worker.net.load_state_dict(clone(workers[leader].net.state_dict()))
    return workers, outcomes
