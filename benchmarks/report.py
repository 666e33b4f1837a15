"""The report step: markdown tables and plots of a results folder, from its stored CSV files and meta.json only.

    python benchmarks/report.py benchmarks/results/overhead      # rewrite overhead.md and overhead.png
    python benchmarks/report.py                                  # every folder under benchmarks/results

Each folder's meta.json names the benchmark script whose ``report`` function writes it; the scripts use the helpers
here for their tables, targets and plots.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driver import META, write_report

RESULTS = Path(__file__).parent / "results"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def metadata_markdown(meta: dict[str, Any]) -> str:
    """The run's metadata as a markdown bullet list (load average at the start and, if recorded, at the end)."""
    lines = [
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}, commit `{meta['commit']}`",
        f"- machine: {meta['machine']}; {meta['software']}",
        f"- load average (1, 5, 15 min) at start: {meta['load_start']}"
        + (f"; at end: {meta['load_end']}" if "load_end" in meta else ""),
    ]
    if "wall_time" in meta:
        lines.append(f"- wall time of the whole benchmark: {meta['wall_time']}")
    return "\n".join(lines) + "\n"


def document(title: str, meta: dict[str, Any], settings: str, sections: Sequence[str], verdicts: str) -> str:
    """A report: its title, how it was run (metadata, then ``settings`` bullets), its sections, then ``verdicts``
    (a heading and the verdict table)."""
    return f"## {title}\n\n" + metadata_markdown(meta) + settings + "\n".join(sections) + f"\n{verdicts}"


# ----------------------------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A target named by what it measures, with its bound: the text and the check come from the same number."""

    what: str  # e.g. "LSGD tau=16 step time within 5% of the no-communication floor"
    limit: float
    at_least: bool = False  # met when the value is >= limit (else <= limit)

    def met(self, value: float) -> bool:
        return value >= self.limit if self.at_least else value <= self.limit

    def row(self, where: str, value: float, measured: str, words: tuple[str, str] = ("met", "missed")) -> list[str]:
        """A verdict-table row: ``[where: what, measured, met|missed]``."""
        return [f"{where}: {self.what}", measured, words[0] if self.met(value) else words[1]]


def verdict_table(rows: Sequence[Sequence[Any]], measured: str = "measured") -> str:
    return markdown_table(["target", measured, "verdict"], rows)


# ----------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------


def pyplot() -> Any:
    """matplotlib's pyplot with the file-only Agg backend, or ``None`` (with a message) if it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'lsgd-lightning[app]').")
        return None
    return plt


def plot(path: Path, draw: Callable[[Any], None], rows: int, cols: int, size: tuple[float, float], **kw: Any) -> None:
    """A ``rows`` x ``cols`` grid of axes (always 2-D), filled by ``draw(axes)`` and saved to ``path``.

    ``size`` is the figure's (width, height) in inches; ``kw`` goes to ``plt.subplots``. Nothing without rows or
    without matplotlib.
    """
    plt = pyplot() if rows else None
    if plt is None:
        return
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, **kw)
    draw(axes)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def bars(axis: Any, labels: Sequence[str], series: Sequence[tuple[Sequence[float], dict[str, Any]]],
         width: float | None = None, **ticks: Any) -> list[int]:  # fmt: skip
    """Groups of bars, one group per label and one bar per series (``(values, bar keyword arguments)``), centred
    on the label's tick; ``ticks`` go to ``set_xticks`` (rotation, ha, fontsize). Returns the groups' x positions."""
    xs = list(range(len(labels)))
    width = width or 0.8 / len(series)
    for k, (values, style) in enumerate(series):
        offset = (k - (len(series) - 1) / 2) * width
        axis.bar([x + offset for x in xs], values, width, **style)
    axis.set_xticks(xs, labels, **ticks)
    return xs


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*", type=Path, help=f"results folders (default: every one under {RESULTS})")
    folders = parser.parse_args(argv).folders or sorted(p.parent for p in RESULTS.rglob(META))
    for folder in folders:
        if not (folder / META).exists():
            parser.error(f"{folder} has no {META}: not a results folder")
        write_report(folder)
        print(f"report: rewrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
