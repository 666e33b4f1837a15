"""How fast whole models move to and from the parameter holder: the limit of the asynchronous strategies' rounds.

    python benchmarks/store_transfer.py                               # CNN7, ResNet20, ResNet50 sizes; P = 2, 4
    python benchmarks/store_transfer.py --models resnet50 --workers 4 --repeats 5 --transports rpc

``lsgd_async`` with ``variant="board"``, ``easgd_async`` and ``downpour`` keep their shared weights (the leader's
copy, the center variable, the held parameters) in rank 0's process, under the lock of the job's c10d store
(:class:`lsgd_lightning.core.board.StoreBoard`). The weights travel by ``torch.distributed.rpc``
(``weight_transport="rpc"``, the default, :class:`lsgd_lightning.core.holder.RpcHolder`) or as values on the store
itself (``"store"``: a ``TCPStore`` served by one thread in rank 0's process). This measures both (``--transports``)
with the package's own board, on flat float32 tensors of the models' sizes (``MODEL_SIZES``), in one local job of P
processes over loopback:

- alone: the last rank writes (``put``) and reads (``get``) one copy while the other ranks wait: seconds per copy
  (not rank 0, whose own transfers to the RPC holder, in its process, are local copies);
- contended: every rank runs ``--repeats`` transactions at once, each under the board's lock, reading the copy and
  writing it back (one ``easgd_async`` round: the center down, the new center up; DOWNPOUR's push-and-fetch moves
  one copy more). Seconds per transaction: the job's wall time for all P·repeats transactions over their number;
  since the lock serializes them (at any P the transactions take turns), this is the shortest interval at which
  the job can run rounds.

Writes ``store_transfer.csv`` (one row per timed transfer) and ``meta.json``, then ``store_transfer.md`` from them
(``python benchmarks/report.py DIR`` rewrites it). Timing belongs on a quiet machine: nothing else running.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist

import driver
from store_transfer_report import MODEL_SIZES, Row, report


def _board(rank: int, world_size: int, args: argparse.Namespace, transport: str) -> Any:
    from lsgd_lightning.core.board import StoreBoard
    from lsgd_lightning.core.collectives import CommMeter
    from lsgd_lightning.core.health import HealthBoard
    from lsgd_lightning.core.holder import RpcHolder

    prefix = f"store_transfer/{transport}"
    health = HealthBoard(f"{prefix}/health", rank, world_size, wait_s=args.timeout)
    board = StoreBoard(f"{prefix}/board", rank, world_size, args.timeout, CommMeter(), torch.device("cpu"), health)
    if transport == "rpc":  # as the strategies open it (AsynchronousStrategy.setup)
        board.holder = RpcHolder("holder", rank, world_size, board.store, args.timeout)
    return board


def _seconds_since(start: float) -> float:
    return time.perf_counter() - start


def worker(rank: int, world_size: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One rank: for every transport and model size, the copies alone (the last rank), then the contended
    transactions (every rank)."""
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    rows: list[Row] = []
    for transport in args.transports:
        board = _board(rank, world_size, args, transport)
        rows.extend(_transfers(rank, world_size, args, board, transport))
        dist.barrier()
        board.holder.close(graceful=True)
    dist.barrier()
    dist.destroy_process_group()
    return [asdict(row) for row in rows]


def _transfers(rank: int, world_size: int, args: argparse.Namespace, board: Any, transport: str) -> list[Row]:
    rows: list[Row] = []
    for model in args.models:
        flat = [torch.randn(MODEL_SIZES[model], generator=torch.Generator().manual_seed(rank))]
        name = f"{model}/copy"
        alone: list[Row] = []
        if rank == world_size - 1:  # not rank 0: its own transfers to the RPC holder stay in its process
            board.put(name, flat)  # untimed: the first write creates the keys
            for repeat in range(args.repeats):
                start = time.perf_counter()
                board.put(name, flat)
                alone.append(Row(model, world_size, "put alone", repeat, _seconds_since(start), transport))
                start = time.perf_counter()
                board.get(name, flat)
                alone.append(Row(model, world_size, "get alone", repeat, _seconds_since(start), transport))
        shared: list[Any] = [alone]
        dist.broadcast_object_list(shared, src=world_size - 1)  # rank 0 returns the rows
        rows.extend(shared[0])
        start = time.perf_counter()
        for _ in range(args.repeats):
            with board.locked():
                board.put(name, board.get(name, flat))
        own = torch.tensor([_seconds_since(start)], dtype=torch.float64)
        dist.all_reduce(own, op=dist.ReduceOp.MAX)  # the job's wall time: the last rank's last transaction
        if rank == 0:
            per_transaction = float(own) / (world_size * args.repeats)
            rows.append(Row(model, world_size, "transaction, contended", 0, per_transaction, transport))
            print(f"{transport} {model} P={world_size}: {per_transaction * 1e3:.1f} ms per transaction", flush=True)
    return rows


def measure(args: argparse.Namespace, meta: dict[str, Any]) -> None:
    rows = [Row(**row) for row in driver.run_jobs(worker, args)]
    driver.write_rows(args.out / "store_transfer.csv", Row, rows)


def main(argv: list[str] | None = None) -> None:
    parser = driver.parser_for(__doc__)
    parser.add_argument("--models", type=driver.str_list, default=",".join(MODEL_SIZES), help=", ".join(MODEL_SIZES))
    parser.add_argument("--workers", type=driver.int_list, default=[2, 4], help="P, one job each")
    parser.add_argument("--repeats", type=int, default=5, help="timed copies alone, and transactions per rank")
    parser.add_argument("--transports", type=driver.str_list, default="rpc,store", help="rpc, store")
    driver.add_job_arguments(parser, timeout=120.0, deadline=900.0, out="store_transfer", timeout_help="board wait")
    args = parser.parse_args(argv)
    driver.check_known(parser, args.models, list(MODEL_SIZES), "--models")
    driver.check_known(parser, args.transports, ["rpc", "store"], "--transports")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    driver.run("store_transfer", args, argv, measure, report)


if __name__ == "__main__":
    main()
