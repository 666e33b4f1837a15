"""netcluster.md and netcluster.png from netcluster.csv and meta.json: what ``benchmarks/netcluster.py`` measured.

netcluster.csv holds one row per (link rate, configuration) with the medians over repeats that the tables show, at
full precision; the raw per-node records (netcluster.json) stay out of the repository.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driver import read_rows, stored_args
from report import Target, bars, document, markdown_table, plot, verdict_table

CONFIGS = ("floor", "lsgd", "easgd", "dataparallel", "lsgd-chain", "lsgd-overlap", "diloco", "streaming_diloco")
LSGD_CONFIGS = ("lsgd", "lsgd-chain", "lsgd-overlap")
FLOOR_TARGET = Target("epoch time within 1.2x of the no-communication floor", 1.2)
SPEEDUP_TARGET = Target("at least 5x faster per epoch than DataParallel", 5.0, at_least=True)
COPIES_TARGET = Target("leader's link carries about one model copy per round", 1.15)


@dataclass
class Summary:
    """One configuration at one link rate: medians over its repeats."""

    rate: str
    config: str
    epoch_s: float  # the slowest node's training epoch
    floor_ratio: float  # epoch_s over the floor's at this rate (nan without a floor)
    dataparallel_speedup: float  # DataParallel's epoch_s over this one's (nan without DataParallel)
    tx_bytes: float  # bytes on the wire sent per node (mean over nodes)
    tx_max_bytes: float  # ... by the node that sent the most
    rx_bytes: float
    payload_bytes: float  # the strategy's comm meter (mean over nodes)
    leader_copies: float  # LSGD variants: the leader's link per round, in model copies (median over rounds), or nan
    leader_copies_min: float
    leader_copies_max: float


def table_row(s: Summary, copy: int) -> list[str]:
    copies = ""
    if not math.isnan(s.leader_copies):
        copies = f"{s.leader_copies:.2f} ({s.leader_copies_min:.2f}-{s.leader_copies_max:.2f})"
    return [
        s.config,
        f"{s.epoch_s:.1f}",
        "n/a" if math.isnan(s.floor_ratio) else f"{s.floor_ratio:.2f}",
        f"{s.tx_bytes / 1e6:.2f} / {s.tx_max_bytes / 1e6:.2f}",
        f"{s.rx_bytes / 1e6:.2f}",
        f"{s.tx_bytes / copy:.1f}",
        f"{s.payload_bytes / 1e6:.2f}",
        copies,
    ]


def verdicts(rows: list[Summary]) -> list[list[str]]:
    """The targets for the LSGD variants at one rate (none without a floor run there)."""
    verdicts: list[list[str]] = []
    if not any(s.config == "floor" for s in rows):
        return verdicts
    has_dataparallel = any(s.config == "dataparallel" for s in rows)
    for s in (s for s in rows if s.config in LSGD_CONFIGS):
        where = f"{s.rate}: {s.config}"
        verdicts.append(FLOOR_TARGET.row(where, s.floor_ratio, f"{s.floor_ratio:.3f}x"))
        if has_dataparallel:
            verdicts.append(SPEEDUP_TARGET.row(where, s.dataparallel_speedup, f"{s.dataparallel_speedup:.2f}x"))
        if not math.isnan(s.leader_copies):
            measured = f"{s.leader_copies:.2f} copies (wire bytes incl. headers)"
            verdicts.append(COPIES_TARGET.row(where, s.leader_copies, measured))
    return verdicts


def report(folder: Path, meta: dict[str, Any]) -> str:
    """netcluster.md's text (a table per link rate, the targets at --target-rate); writes netcluster.png."""
    args = stored_args(meta)
    summaries = read_rows(folder / "netcluster.csv", Summary)
    copy = meta["model_copy_bytes"]
    header = ["configuration", "epoch s", "ratio to floor", "tx MB/node (mean / max)", "rx MB/node"]
    header += ["tx in model copies", "payload MB/node (comm meter)", "leader link: copies/round (range)"]
    sections, targets = [], []
    for rate in args.rates:
        rows = [s for s in summaries if s.rate == rate]
        sections.append(f"### {rate} links\n\n" + markdown_table(header, [table_row(s, copy) for s in rows]))
        if rate == args.target_rate:
            targets += verdicts(rows)
    settings = (
        f"{args.nodes} nodes (one worker each, {args.threads} thread(s)), {args.model}, tau={args.tau}, batch "
        f"{args.batch_size} per node, {args.samples} samples per epoch ({meta['steps_per_node']} steps per node), "
        f"{args.repeats} repeat(s); one model copy = 4·d' = {copy:,} bytes"
    )
    plot(folder / "netcluster.png", lambda axes: _draw(axes[0], summaries, args), 1, 2, (12, 3.8))
    heading = f"### Targets (at {args.target_rate}; epoch times are medians over repeats)\n\n"
    judged = heading + (verdict_table(targets) if targets else "not measured at that rate\n")
    title = "Bandwidth-limited cluster (network namespaces, tbf)"
    return document(title, meta, f"- settings: {settings}\n\n", sections, judged)


def _draw(axes: Any, summaries: list[Summary], args: Any) -> None:
    """Epoch time and bytes sent per node, per configuration, one bar per link rate."""
    by_rate = {rate: [s for s in summaries if s.rate == rate] for rate in args.rates}
    labels = [s.config for s in next(iter(by_rate.values()))]
    panels = [("epoch time (s), slowest node", "epoch_s", 1.0)]
    panels += [("bytes sent per node per epoch (MB, wire)", "tx_bytes", 1e-6)]
    for axis, (title, name, scale) in zip(axes, panels):
        series = [([getattr(s, name) * scale for s in rows], {"label": rate}) for rate, rows in by_rate.items()]
        bars(axis, labels, series, rotation=25, ha="right")
        axis.set_title(f"{title}\n{args.nodes} nodes, {args.model}, tau={args.tau}, batch {args.batch_size}")
        axis.legend()
