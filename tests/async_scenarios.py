"""Training scenarios of the asynchronous strategies, run inside each worker process of a multi-process test job.

Each scenario reuses the harness of ``tests/scenarios.py`` (same model, data, seed and recorder). One worker is
slowed down (a sleep after each of its steps) so the transactions on the board interleave in an order that differs
from lockstep; every round records the board's transaction number, which lets the reference simulation replay the
same order (``tests/async_simulation.py``).
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lsgd_lightning import AsyncEASGDStrategy, AsyncLSGDStrategy, DownpourStrategy
from tests import models
from tests.scenarios import TIMEOUT, _expect_error, _fit, run_scenarios

LSGD_ASYNC = {"tau": 3, "pull_strength": 0.3, "leader_window": 2, "variant": "board"}  # the leader board
EASGD_ASYNC = {"tau": 3, "moving_rate": 0.3}
DOWNPOUR = {"tau": 3}
DOWNPOUR_PUSH_FETCH = {"push_every": 2, "fetch_every": 3, "push_scale": "1/P"}  # Dean et al.'s n_push, n_fetch
SLOW_RANK, SLOW_S = 1, 0.05
HOLD_S = 60.0  # how long the straggler waits for a fast worker to get ahead (see Straggler)


class Straggler(pl.Callback):
    """Sleep ``seconds`` after every training batch of rank ``rank`` (a slower worker).

    With ``hold_until`` = (s, t), the straggler also waits, before its step s + 1, until a fast worker has finished
    its step t (t > s; at most ``HOLD_S`` seconds): on a loaded machine a sleep alone does not guarantee that the
    fast workers get ahead, but a strategy that kept the workers in lockstep could never let them, so the wait would
    run out and the recorded order would show it.
    """

    def __init__(self, rank: int, seconds: float, hold_until: tuple[int, int] | None = None) -> None:
        self.rank, self.seconds, self.hold_until = rank, seconds, hold_until

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        store = torch.distributed.distributed_c10d._get_default_store()
        key = f"tests/ahead/{trainer.strategy._health.prefix}"  # unique to this fit, the same on every rank
        if trainer.global_rank != self.rank:
            if self.hold_until is not None and trainer.global_step == self.hold_until[1]:
                store.set(key, "1")
            return
        time.sleep(self.seconds)
        if self.hold_until is not None and trainer.global_step == self.hold_until[0]:
            deadline = time.monotonic() + HOLD_S
            while not store.check([key]) and time.monotonic() < deadline:
                time.sleep(0.01)


class FailAt(pl.Callback):
    """Rank ``rank`` fails after step ``step``: by raising, or (``kill``) by leaving the process without a word."""

    def __init__(self, rank: int, step: int, kill: bool = False) -> None:
        self.rank, self.step, self.kill = rank, step, kill

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            if self.kill:
                os._exit(0)
            raise ValueError(f"injected failure on rank {self.rank}")


def make(name: str, **overrides: Any) -> pl.strategies.Strategy:
    cls, settings = {
        "lsgd_async": (AsyncLSGDStrategy, LSGD_ASYNC),
        "easgd_async": (AsyncEASGDStrategy, EASGD_ASYNC),
        "downpour": (DownpourStrategy, DOWNPOUR),
    }[name]
    return cls(**{**settings, "final_sync": False, "timeout": TIMEOUT, **overrides})


def _straggling(
    rank: int, world_size: int, strategy: pl.strategies.Strategy, hold: bool = False, **kwargs: Any
) -> dict[str, Any]:
    extra = [Straggler(SLOW_RANK, SLOW_S, (2, 6) if hold else None), *kwargs.pop("extra_callbacks", [])]
    result = _fit(rank, world_size, strategy, extra_callbacks=extra, **kwargs)
    board = strategy._board
    if board is not None:  # where the weights went: the holder used, and whether the store has a weight entry
        result["holder"] = type(board.holder).__name__
        result["weights_on_store"] = any(board.store.check([f"t/{n}/0/0"]) for n in ("center", "parameters", "leader"))
    return result


def _checkpointer(directory: Path) -> ModelCheckpoint:
    return ModelCheckpoint(
        dirpath=directory, filename="{epoch}", save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True
    )


def scenario(name: str, rank: int, world_size: int, out: Path) -> dict[str, Any]:
    if name == "easgd_async_eamsgd":  # Algorithm 2 (EAMSGD), the straggler as in "easgd_async"
        strategy = make("easgd_async", momentum_rule="eamsgd")
        return _straggling(rank, world_size, strategy, hold=True, make_model=models.NesterovRegressor)
    if name == "downpour_push_fetch":  # pushes after steps 2, 4, 6, ..., fetches after 3, 6, 9, ...
        return _straggling(rank, world_size, make("downpour", **DOWNPOUR_PUSH_FETCH), hold=True)
    if name in ("lsgd_async", "easgd_async", "downpour"):  # a fast worker finishes step 6 before the straggler's 3
        return _straggling(rank, world_size, make(name), hold=True)
    if name.endswith("_store"):  # the same, the weights as values on the store (weight_transport="store")
        return _straggling(rank, world_size, make(name.removesuffix("_store"), weight_transport="store"), hold=True)
    if name.endswith("_diverge"):  # rank 2's weights turn NaN before step 4
        strategy = make(name.removesuffix("_diverge"))
        return _straggling(rank, world_size, strategy, make_model=lambda: models.DivergingRegressor(rank=2, step=4))
    if name.endswith("_eval"):  # validation every 3 steps (sync_dist logging) and the final sync
        strategy = make(name.removesuffix("_eval"), final_sync=True)
        result = _straggling(rank, world_size, strategy, val=True, val_check_interval=3)
        result["reference_after_fit"] = strategy.layout.named_tensors(strategy._reference_weights())
        return result
    if name.endswith("_resume"):  # 3 epochs with a checkpoint per epoch, then again from the epoch-0 checkpoint
        kind = name.removesuffix("_resume")
        common: dict[str, Any] = {"max_steps": -1, "max_epochs": 3, "enable_checkpointing": True, "shuffle": True}
        first = _straggling(rank, world_size, make(kind, tau=4), extra_callbacks=[_checkpointer(out / "a")], **common)
        again = _straggling(
            rank,
            world_size,
            make(kind, tau=4),
            ckpt_path=str(out / "a" / "epoch=0.ckpt"),
            extra_callbacks=[_checkpointer(out / "b")],
            **common,
        )
        return {"uninterrupted": first, "resumed": again}
    if name == "lsgd_async_crash":  # rank 2 raises at step 5; the others must stop with its name, not hang
        strategy = make("lsgd_async", timeout=timedelta(seconds=30))
        started = time.monotonic()
        result = _expect_error(lambda: _straggling(rank, world_size, strategy, extra_callbacks=[FailAt(2, 5)]))
        seconds = time.monotonic() - started
        torch.distributed.barrier()  # rank 0 serves the store: keep it until every rank has seen the failure
        return {**result, "seconds": seconds}
    raise KeyError(name)


def run_async_scenarios(rank: int, world_size: int, out: str, names: list[str]) -> None:
    run_scenarios(rank, world_size, out, names, run=scenario)


def run_killed(rank: int, world_size: int, out: str) -> None:
    """The last rank leaves without a word after step 5: the others must give up after the (short) timeout."""
    strategy = make("lsgd_async", timeout=timedelta(seconds=4))
    started = time.monotonic()
    victim = FailAt(world_size - 1, 5, kill=True)
    result = _expect_error(lambda: _fit(rank, world_size, strategy, extra_callbacks=[victim]))
    result["seconds"] = time.monotonic() - started
    torch.save(result, Path(out) / f"rank{rank}.pt")
    os._exit(0)  # the process group lost a member: skip its teardown


def run_foreign_agent(rank: int, world_size: int, out: str) -> None:
    """Rank 1 already runs an RPC agent of its own when ``fit`` starts: it must fail with a clear error, and the
    others must name it instead of waiting in ``init_rpc`` (which has no timeout of ours) for it."""
    from torch.distributed import rpc

    if rank == 1:
        options = rpc.TensorPipeRpcBackendOptions(init_method=f"file://{Path(out) / 'own_agent'}")
        rpc.init_rpc("own-agent", rank=0, world_size=1, rpc_backend_options=options)
    started = time.monotonic()
    result = _expect_error(lambda: _fit(rank, world_size, make("easgd_async")))
    result["seconds"] = time.monotonic() - started
    if rank == 1:
        rpc.shutdown()
    torch.save(result, Path(out) / f"rank{rank}.pt")
