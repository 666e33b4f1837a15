"""How fast whole models move through the job's store: the limit of the asynchronous strategies' board transfers.

    python benchmarks/store_transfer.py                               # CNN7, ResNet20, ResNet50 sizes; P = 2, 4
    python benchmarks/store_transfer.py --models resnet50 --workers 4 --repeats 5

``lsgd_async`` with ``variant="board"``, ``easgd_async`` and ``downpour`` keep their shared weights (the leader's
copy, the center variable, the held parameters) on the job's c10d store (:class:`lsgd_lightning.core.board.StoreBoard`:
a ``TCPStore`` served by one thread in rank 0's process). This measures that path with the package's own board, on
flat float32 tensors of the models' sizes (``MODEL_SIZES``), in one local job of P processes over loopback:

- alone: rank 0 writes (``put``) and reads (``get``) one copy while the other ranks wait: seconds per copy;
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


def _board(rank: int, world_size: int, args: argparse.Namespace) -> Any:
    from lsgd_lightning.core.board import StoreBoard
    from lsgd_lightning.core.collectives import CommMeter
    from lsgd_lightning.core.health import HealthBoard

    health = HealthBoard("store_transfer/health", rank, world_size, wait_s=args.timeout)
    return StoreBoard("store_transfer/board", rank, world_size, args.timeout, CommMeter(), torch.device("cpu"), health)


def _seconds_since(start: float) -> float:
    return time.perf_counter() - start


def worker(rank: int, world_size: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One rank: for every model size, the copies alone (rank 0), then the contended transactions (every rank)."""
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    board = _board(rank, world_size, args)
    rows: list[Row] = []
    for model in args.models:
        flat = [torch.randn(MODEL_SIZES[model], generator=torch.Generator().manual_seed(rank))]
        name = f"{model}/copy"
        if rank == 0:
            board.put(name, flat)  # untimed: the first write creates the keys
            for repeat in range(args.repeats):
                start = time.perf_counter()
                board.put(name, flat)
                rows.append(Row(model, world_size, "put alone", repeat, _seconds_since(start)))
                start = time.perf_counter()
                board.get(name, flat)
                rows.append(Row(model, world_size, "get alone", repeat, _seconds_since(start)))
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.repeats):
            with board.locked():
                board.put(name, board.get(name, flat))
        own = torch.tensor([_seconds_since(start)], dtype=torch.float64)
        dist.all_reduce(own, op=dist.ReduceOp.MAX)  # the job's wall time: the last rank's last transaction
        if rank == 0:
            per_transaction = float(own) / (world_size * args.repeats)
            rows.append(Row(model, world_size, "transaction, contended", 0, per_transaction))
            print(f"{model} P={world_size}: {per_transaction * 1e3:.1f} ms per transaction", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return [asdict(row) for row in rows]


def measure(args: argparse.Namespace, meta: dict[str, Any]) -> None:
    rows = [Row(**row) for row in driver.run_jobs(worker, args)]
    driver.write_rows(args.out / "store_transfer.csv", Row, rows)


def main(argv: list[str] | None = None) -> None:
    parser = driver.parser_for(__doc__)
    parser.add_argument("--models", type=driver.str_list, default=",".join(MODEL_SIZES), help=", ".join(MODEL_SIZES))
    parser.add_argument("--workers", type=driver.int_list, default=[2, 4], help="P, one job each")
    parser.add_argument("--repeats", type=int, default=5, help="timed copies alone, and transactions per rank")
    driver.add_job_arguments(parser, timeout=120.0, deadline=900.0, out="store_transfer", timeout_help="board wait")
    args = parser.parse_args(argv)
    driver.check_known(parser, args.models, list(MODEL_SIZES), "--models")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    driver.run("store_transfer", args, argv, measure, report)


if __name__ == "__main__":
    main()
