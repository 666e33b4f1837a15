"""Workers for ``tests/test_holder.py`` (module level, so that spawned processes can import them)."""

from __future__ import annotations

import warnings
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from lsgd_lightning.core.holder import RpcHolder, StoreHolder


def _values(seed: int) -> list[torch.Tensor]:
    """Two flats: 5 MiB of float32 (more than one store piece) and a few float64 values."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(5 << 18, generator=generator), torch.randn(7, generator=generator, dtype=torch.float64)]


def exchange(rank: int, world_size: int, transport: str) -> dict[str, Any]:
    """Every rank in turn puts its own values and the next rank reads them; then a graceful close and a read after it.

    Returns what each read saw, for the parent to compare with :func:`_values`.
    """
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    store = dist.distributed_c10d._get_default_store()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        holder = (
            RpcHolder("test/holder", rank, world_size, store, timeout_s=30.0)
            if transport == "rpc"
            else StoreHolder(dist.PrefixStore("test/holder/", store))
        )
    like = _values(0)
    seen: dict[str, Any] = {"start warnings": [str(w.message) for w in caught]}
    for writer in range(world_size):
        if rank == writer:
            own = _values(writer)
            holder.put("weights", own)
            own[0].add_(1.0)  # changing the caller's tensor afterwards must not change what is held
        dist.barrier()
        if rank == (writer + 1) % world_size:
            got = holder.get("weights", like)
            seen[f"after {writer}"] = [t.clone() for t in got]
            got[0].zero_()  # nor may changing what a read returned
        dist.barrier()
    try:
        holder.get("weights", [torch.zeros(3), like[1]])
    except RuntimeError as error:
        seen["wrong size"] = str(error)
    dist.barrier()
    holder.close(graceful=True)
    seen["after close"] = holder.get("weights", like)  # the last values, kept here
    dist.destroy_process_group()
    return seen


def after_users_own_agent(rank: int, world_size: int) -> str:
    """The user started an RPC agent of their own: opening the holder must fail at once, saying what to do."""
    from torch.distributed import rpc

    from lsgd_lightning.local_job import free_port

    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    options = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{free_port()}")
    rpc.init_rpc("users-own", rank=rank, world_size=world_size, rpc_backend_options=options)
    try:
        RpcHolder("test/holder", rank, world_size, dist.distributed_c10d._get_default_store(), timeout_s=10.0)
    except RuntimeError as error:
        return str(error)
    finally:
        rpc.shutdown()
        dist.destroy_process_group()
    return "no error"
