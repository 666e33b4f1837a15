"""store_transfer.md from store_transfer.csv and meta.json: what ``benchmarks/store_transfer.py`` measured."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driver import read_rows, stored_args
from report import document, markdown_table

# float32 values per model copy: CNN7's parameters, ResNet20's parameters and floating buffers (d', what the
# strategies move), torchvision's ResNet-50 parameters.
MODEL_SIZES = {"cnn7": 351_946, "resnet20": 271_098, "resnet50": 25_557_032}


@dataclass
class Row:
    model: str
    workers: int
    kind: str  # "put alone", "get alone" (rank 0, one copy) or "transaction, contended" (per transaction)
    repeat: int
    seconds: float
    transport: str = "store"  # the holder's transport: "rpc" or "store" (runs before the RPC holder: "store")


def _median_range(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:,.1f} [{min(values) * 1e3:,.1f}-{max(values) * 1e3:,.1f}]"


def report(folder: Path, meta: dict[str, Any]) -> str:
    args = stored_args(meta)
    rows = read_rows(Path(folder) / "store_transfer.csv", Row)
    table = []
    transports = getattr(args, "transports", ["store"])
    for model, transport, workers in ((m, t, w) for m in args.models for t in transports for w in args.workers):
        megabytes = 4 * MODEL_SIZES[model] / 1e6
        mine = [row for row in rows if (row.model, row.transport, row.workers) == (model, transport, workers)]
        put = [row.seconds for row in mine if row.kind == "put alone"]
        get = [row.seconds for row in mine if row.kind == "get alone"]
        (transaction,) = [row.seconds for row in mine if row.kind == "transaction, contended"]
        table.append(
            [
                model,
                transport,
                workers,
                f"{megabytes:,.1f}",
                _median_range(put),
                _median_range(get),
                f"{megabytes / statistics.median(put):,.0f} / {megabytes / statistics.median(get):,.0f}",
                f"{transaction * 1e3:,.1f}",
                f"{1 / transaction:,.1f}",
            ]
        )
    header = [
        "model size",
        "transport",
        "P",
        "MB per copy",
        "put alone, ms (median [min-max])",
        "get alone, ms",
        "MB/s put / get",
        "ms per transaction, all P at once",
        "transactions per second, whole job",
    ]
    settings = (
        f"- settings: {args.repeats} timed copies alone and {args.repeats} transactions per rank; flat float32 "
        "tensors of the models' sizes through the package's `StoreBoard` over loopback, the weights held in rank 0's "
        "process and moved by `torch.distributed.rpc` (`rpc`) or as values on the job's `TCPStore` (`store`); a "
        "transaction = the store's lock, read the copy, write it back (one `easgd_async` round); copies alone from "
        "the last rank (rank 0's own transfers to the RPC holder, in its process, are local copies, as in the "
        "strategies)\n\n"
    )
    reading = (
        "The lock serializes the transactions, so the last column is what the whole job can do, however many "
        "workers share it: an asynchronous strategy whose workers together ask for more rounds per second than "
        "that waits for the lock. `easgd_async` and the board variant of `lsgd_async` run one transaction per "
        "worker every tau of its steps; `downpour` with its preset (tau = 1) one per worker and step.\n"
    )
    return document(
        "Whole models to and from the parameter holder (`benchmarks/store_transfer.py`)",
        meta,
        settings,
        [markdown_table(header, table), reading],
        "",
    )
