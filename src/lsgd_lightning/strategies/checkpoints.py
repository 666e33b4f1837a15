"""Sharded checkpoints: each rank's own replica in a shard beside the main file, which holds the evaluated model.

Layout of a checkpoint written at ``path`` (``path`` is whatever Lightning or the user chose)::

    path                      Lightning's checkpoint; its ``state_dict`` is the strategy's evaluated model (the
                              leader, the center, ...), so any Lightning tool can load it as a plain model
    path.shards/rank_00000.pt one shard per rank: that rank's weights, optimizer and scheduler state, the strategy's
    path.shards/rank_00001.pt state (step count, loss window, communication counters, RNG, algorithm state)
    ...

Shards live next to the *real* file: a path through a symbolic link (Lightning's ``save_last="link"``) is resolved
before the shard folder is derived, so ``last.ckpt`` finds the shards of the checkpoint it points to, and a folder of
checkpoints can be moved or copied as a whole. Every write is atomic (a temporary file renamed into place).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from ..core.collectives import all_gather_single
from ..core.flat import master_dtype, state_dict_with

if TYPE_CHECKING:
    from .base import ReplicaStrategy

SHARD_FORMAT = "lsgd_lightning.shard.v1"
CHECKPOINT_META_KEY = "lsgd_lightning"
PathLike = str | os.PathLike


def real_path(checkpoint_path: PathLike) -> Path:
    """The checkpoint file itself: symbolic links resolved, relative paths made absolute."""
    return Path(os.path.realpath(os.fspath(checkpoint_path)))


def shard_dir(checkpoint_path: PathLike) -> Path:
    """Where the per-rank shards of the checkpoint at ``checkpoint_path`` live (beside the real file)."""
    path = real_path(checkpoint_path)
    return path.with_name(f"{path.name}.shards")


def shard_path(checkpoint_path: PathLike, rank: int) -> Path:
    return shard_dir(checkpoint_path) / f"rank_{rank:05d}.pt"


def atomic_torch_save(obj: Any, path: Path, save: Callable[[Any, Path], None] | None = None) -> None:
    """Write ``obj`` to a temporary file beside ``path`` and rename it into place.

    A crash mid-write leaves at most a stray ``*.tmp`` file, never a truncated ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        (save or torch.save)(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def shard_body(
    strategy: str, rank: int, world_size: int, own: Mapping[str, Tensor], checkpoint: Mapping[str, Any], state: Any
) -> dict[str, Any]:
    """A rank's shard: its own weights ``own``, the optimizer and scheduler state Lightning put in ``checkpoint``,
    and the strategy's ``state``."""
    return {
        "format": SHARD_FORMAT,
        "strategy": strategy,
        "rank": rank,
        "world_size": world_size,
        "state_dict": dict(own),
        "optimizer_states": checkpoint.get("optimizer_states", []),
        "lr_schedulers": checkpoint.get("lr_schedulers", []),
        "strategy_state": state,
    }


def main_body(
    checkpoint: Mapping[str, Any], evaluated: Mapping[str, Tensor], strategy: str, world_size: int, reference: str
) -> dict[str, Any]:
    """Lightning's ``checkpoint`` with the evaluated model as its ``state_dict`` and what wrote it."""
    main = dict(checkpoint)
    main["state_dict"] = dict(evaluated)
    main[CHECKPOINT_META_KEY] = {"strategy": strategy, "world_size": world_size, "reference": reference}
    return main


def read_shard(path: Path, rank: int, world_size: int) -> tuple[dict[str, Any] | None, str | None]:
    """``(shard, None)``, or ``(None, why not)`` if the file is missing, unreadable or belongs to another rank."""
    if not path.is_file():
        return None, f"{path} does not exist"
    try:
        shard = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or truncated file: report it, never hang the other ranks
        return None, f"{path} could not be read ({type(exc).__name__}: {exc})"
    if not isinstance(shard, dict) or shard.get("format") != SHARD_FORMAT:
        return None, f"{path} is not an lsgd_lightning shard"
    if shard.get("rank") != rank or shard.get("world_size") != world_size:
        return None, f"{path} belongs to rank {shard.get('rank')} of {shard.get('world_size')}"
    return shard, None


def load_main_checkpoint(
    load: Callable[..., dict[str, Any]], path: PathLike, weights_only: bool | None
) -> dict[str, Any]:
    """``load(path)`` with an error that names the file when it is truncated or not a checkpoint."""
    try:
        return load(path, weights_only=weights_only)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise RuntimeError(
            f"Checkpoint {os.fspath(path)!r} could not be read ({type(error).__name__}: {str(error)[:300]}). It is "
            "corrupt or incomplete; resume from an earlier checkpoint."
        ) from error


def state_dicts_to_save(strategy: ReplicaStrategy) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """This rank's own weights and the reference model's, as state dicts (a collective with several workers)."""
    module, layout = strategy.lightning_module, strategy.layout
    assert module is not None
    if strategy._stashed_own is not None:  # ModelCheckpoint in on_validation_end: the reference is swapped in
        return state_dict_with(module, layout.named_tensors(strategy._stashed_own)), module.state_dict()
    own = module.state_dict()
    if strategy.world_size == 1:
        return own, own
    return own, state_dict_with(module, layout.named_tensors(strategy._reference_weights()))


def strategy_state(strategy: ReplicaStrategy) -> dict[str, Any]:
    """What a shard holds besides weights and optimizer state: steps, losses, counters, RNG, algorithm state."""
    return {
        "steps": strategy._steps,
        **strategy._window().state_dict(),
        "comm": strategy.comm.state_dict(),
        "rng": get_rng_state(strategy.root_device),
        "extra": strategy._extra_state_dict(),
    }


def load_strategy_state(strategy: ReplicaStrategy, state: Mapping[str, Any]) -> None:
    """Restore what :func:`strategy_state` saved (but the RNG, restored when training starts)."""
    strategy._steps = int(state["steps"])
    strategy._window().load_state_dict(state)
    strategy.comm.load_state_dict(state["comm"])
    strategy._load_extra_state_dict(state.get("extra", {}))


def ranks_that_failed(strategy: ReplicaStrategy, failed_here: bool) -> list[int]:
    """Every rank's ``failed_here``, gathered (a collective): the ranks for which it was True."""
    flags = torch.tensor([1.0 if failed_here else 0.0], device=strategy.root_device)
    if strategy.world_size > 1:
        gathered = torch.empty(strategy.world_size, device=strategy.root_device)
        all_gather_single(gathered, flags)
        flags = gathered
    return [rank for rank, flag in enumerate(flags.tolist()) if flag]


def save_sharded(
    strategy: ReplicaStrategy, checkpoint: dict[str, Any], filepath: PathLike, storage_options: Any | None
) -> None:
    """Every rank writes its own shard; rank 0 then writes the main file with the reference weights.

    Called on every rank (ModelCheckpoint and ``Trainer.save_checkpoint`` do). The main file is written last,
    after a barrier, so a main file on disk means its shards are complete.
    """
    path = Path(strategy.broadcast(os.fspath(filepath), src=0))  # callers may pass per-rank paths
    own, reference = state_dicts_to_save(strategy)
    rank, world_size = strategy.global_rank, strategy.world_size
    shard = shard_body(strategy.strategy_name, rank, world_size, own, checkpoint, strategy_state(strategy))
    atomic_torch_save(shard, shard_path(path, rank))
    strategy.barrier("lsgd_lightning.save_shards")
    if strategy.is_global_zero:
        # what the main file holds: "average" with eval_on="average", else the reference model ("leader", ...)
        saved = strategy.eval_on if strategy.eval_on in strategy.also_evaluates else strategy.reference_name
        main = main_body(checkpoint, reference, strategy.strategy_name, world_size, saved)
        io = strategy.checkpoint_io
        atomic_torch_save(main, path, lambda obj, tmp: io.save_checkpoint(obj, tmp, storage_options))
    strategy.barrier("lsgd_lightning.save_main")


def remove_sharded(strategy: ReplicaStrategy, filepath: PathLike) -> None:
    """Remove a checkpoint and this rank's shard; rank 0 removes the main file and the emptied shard folder."""
    path = Path(strategy.broadcast(os.fspath(filepath), src=0))
    # A symbolic link (save_last="link") owns no shards: removing it must leave its target's shards alone.
    if not path.is_symlink():
        shard_path(path, strategy.global_rank).unlink(missing_ok=True)
    strategy.barrier("lsgd_lightning.remove_shards")
    if strategy.is_global_zero:
        directory = shard_dir(path)
        strategy.checkpoint_io.remove_checkpoint(path)
        if not path.exists() and directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()


def load_sharded(strategy: ReplicaStrategy, checkpoint: dict[str, Any], path: PathLike) -> dict[str, Any]:
    """Lightning's loaded main file ``checkpoint``, as this rank must use it.

    - Fitting (resume): this rank's own shard replaces the weights, optimizer and scheduler state, and the strategy
      state is kept for ``setup``. All ranks decide together (one all-gather) whether every shard could be read, so
      a missing or corrupt shard raises the same clear error on every rank instead of leaving some ranks waiting in
      a collective. A checkpoint of another strategy or number of workers gives everyone its reference weights.
    - Evaluating (validate, test, predict): the checkpoint is what is evaluated: its reference model (the main
      file), or with ``eval_on="local"`` each rank's own shard where it exists.
    """
    meta = checkpoint.get(CHECKPOINT_META_KEY)
    module = strategy.lightning_module
    trainer = module._trainer if module is not None else None
    if trainer is None:
        return checkpoint
    rank, world_size = strategy.global_rank, strategy.world_size
    same_job = meta is not None and meta.get("strategy") == strategy.strategy_name
    same_job = same_job and int(meta.get("world_size", -1)) == world_size
    if trainer.state.fn != TrainerFn.FITTING:
        strategy._evaluating_checkpoint = True
        if same_job and strategy.eval_on == "local":
            shard, _ = read_shard(shard_path(path, rank), rank, world_size)
            if shard is not None:
                checkpoint["state_dict"] = shard["state_dict"]
        return checkpoint
    if meta is None:
        return checkpoint  # a plain Lightning checkpoint: its weights are everyone's start
    if not same_job:
        rank_zero_warn(
            f"Checkpoint {os.fspath(path)!r} was written by {meta.get('strategy')!r} with {meta.get('world_size')} "
            f"workers; resuming {strategy.strategy_name!r} with {world_size}. Every worker starts from the "
            f"checkpoint's {meta.get('reference', 'reference')} weights."
        )
        return checkpoint
    shard, error = read_shard(shard_path(path, rank), rank, world_size)
    failed = ranks_that_failed(strategy, error is not None)
    if failed:
        detail = f" This rank: {error}." if error else ""
        raise RuntimeError(
            f"Cannot resume from {os.fspath(path)!r}: the shard(s) of rank(s) {failed} are missing or unreadable "
            f"(expected {os.fspath(shard_dir(path))}/rank_NNNNN.pt).{detail} Resume from an earlier checkpoint "
            "whose shards are complete."
        )
    assert shard is not None
    strategy._resumed_main_state_dict = checkpoint["state_dict"]
    strategy._resumed_state = shard["strategy_state"]
    checkpoint["state_dict"] = shard["state_dict"]
    checkpoint["optimizer_states"] = shard["optimizer_states"]
    checkpoint["lr_schedulers"] = shard["lr_schedulers"]
    return checkpoint


def saved_flats(flats: list[Tensor]) -> list[Tensor]:
    """Per-bucket algorithm state (EASGD's center, D²'s previous iterate, ...) as CPU copies for a shard."""
    return [flat.detach().cpu().clone() for flat in flats]


def restored_flats(saved: Any, buckets: Any, what: str) -> list[Tensor]:
    """What :func:`saved_flats` wrote, back on the buckets' devices in master precision (float32 for half-precision
    buckets); ``RuntimeError`` naming ``what`` if it does not fit the model (another model or strategy)."""
    saved = list(saved or [])
    if len(saved) != len(buckets) or any(t.numel() != b.numel for t, b in zip(saved, buckets)):
        raise RuntimeError(f"The checkpoint's {what} does not match this model's parameters.")
    return [t.to(device=b.device, dtype=master_dtype(b.dtype)) for t, b in zip(saved, buckets)]


def get_rng_state(device: torch.device) -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, Tensor], device: torch.device) -> None:
    if "cpu" in state:
        torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
