"""reproduce.md and its plots from the stored curves, runs and leaders and meta.json: what ``reproduce.py`` measured.

Also what both sides share: the stored rows and the optimizer changes some strategies need (said in the report).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from driver import read_rows
from report import bars, markdown_table, metadata_markdown, plot

CURVES, RUNS, LEADERS = "reproduce_curves.csv", "reproduce_runs.csv", "reproduce_leaders.csv"
LEADER_HEADER = ["run", "rounds", "rounds led by worker 0 / 1 / ...", "leader changes"]
# Changes to the preset, and why, per strategy (before the user's overrides): what the paper evaluates for LSGD, and
# the optimizer for the strategies that refuse the presets' Nesterov SGD.
STRATEGY_OVERRIDES: dict[str, tuple[tuple[str, ...], str]] = {
    "lsgd": (
        ("strategy.eval_on=average", "strategy.bn_recalibration_batches=20"),
        "as the paper: every LSGD figure reports the test error of the workers' average, with BatchNorm statistics "
        "re-estimated on training batches (the authors' code); models without BatchNorm skip the re-estimation",
    ),
    "d2": (
        ("optim.momentum=0", "optim.nesterov=false"),
        "D² refuses momentum: its correction needs steps of exactly lr * gradient",
    ),
    "signum": (
        ("optim.nesterov=false", "optim.lr=1e-3"),
        "Signum refuses Nesterov, keeps momentum 0.9 as its beta, and moves every weight by lr per step",
    ),
}


@dataclass
class Point:
    """One evaluation of one run (a row of reproduce_curves.csv)."""

    strategy: str
    workers: int
    train_s: float  # wall time since fit started, evaluation excluded
    wall_s: float
    step: int  # optimizer steps per worker
    epoch: int
    test_error: float


@dataclass
class RunRecord:
    """One run's totals (a row of reproduce_runs.csv)."""

    strategy: str
    workers: int
    steps: int
    comm_bytes: float  # rank 0's training traffic (evaluation swaps and the final sync left out)
    comm_rounds: float


@dataclass
class Leader:
    """The leader LSGD elected at one round (a row of reproduce_leaders.csv)."""

    strategy: str
    workers: int
    step: int
    leader: int


@dataclass
class Run:
    record: RunRecord
    points: list[Point] = field(default_factory=list)
    leaders: list[Leader] = field(default_factory=list)

    @property
    def label(self) -> str:
        return run_label(self.record.strategy, self.record.workers)

    def led(self) -> list[int]:
        """Rounds led by each worker."""
        counts = Counter(leader.leader for leader in self.leaders)
        return [counts[k] for k in range(self.record.workers)]


def run_label(strategy: str, workers: int) -> str:
    return "SGD (1 worker)" if strategy == "sgd" else f"{strategy} ({workers} workers)"


def load_runs(folder: Path) -> list[Run]:
    """The runs in the order they ran, with their evaluation points and elected leaders."""
    runs = {(r.strategy, r.workers): Run(r) for r in read_rows(folder / RUNS, RunRecord)}
    for point in read_rows(folder / CURVES, Point):
        runs[(point.strategy, point.workers)].points.append(point)
    for leader in read_rows(folder / LEADERS, Leader):
        runs[(leader.strategy, leader.workers)].leaders.append(leader)
    return list(runs.values())


def report(folder: Path, meta: dict[str, Any]) -> str:
    """reproduce.md's text (final errors, time to the target error, leader counts); writes the two plots."""
    preset, runs = meta["preset"], load_runs(folder)
    target = preset["target_error"]
    header = ["run", "final test error %", "best %", "training s", "steps/worker"]
    header += [f"time to {target * 100:.0f}% error", "payload bytes/step/worker"]
    led = [r for r in runs if r.leaders]
    plot(folder / "reproduce_error.png", lambda axes: _draw_errors(axes[0], runs, target), 1, 2, (12, 4))
    if led:
        size = (12, 3 * len(led))
        plot(
            folder / "reproduce_leader.png",
            lambda axes: _draw_leaders(axes, led),
            len(led),
            2,
            size,
            width_ratios=[3, 1],
        )
    return (
        f"## Test error against time and steps (preset `{meta['preset_name']}`)\n\n"
        + metadata_markdown(meta)
        + _settings(meta, runs)
        + "\n"
        + markdown_table(header, [_row(r, target) for r in runs])
        + "\n"
        + (markdown_table(LEADER_HEADER, [_leader_row(r) for r in led]) if led else "")
    )


def _row(run: Run, target: float) -> list[str]:
    last = run.points[-1] if run.points else None
    best = min((p.test_error for p in run.points), default=float("nan"))
    reached = next((p for p in run.points if p.test_error <= target), None)
    return [
        run.label,
        f"{last.test_error * 100:.1f}" if last else "n/a",
        f"{best * 100:.1f}",
        f"{last.train_s:.0f}" if last else "n/a",
        str(run.record.steps),
        f"{reached.train_s:.0f} s / {reached.step} steps" if reached else "not reached",
        f"{run.record.comm_bytes / max(1, run.record.steps):,.0f}",
    ]


def _leader_row(run: Run) -> list[Any]:
    changes = sum(a.leader != b.leader for a, b in zip(run.leaders, run.leaders[1:]))
    return [run.label, len(run.leaders), " / ".join(map(str, run.led())), changes]


def _settings(meta: dict[str, Any], runs: list[Run]) -> str:
    preset = meta["preset"]
    every = f"{preset['val_every']} steps" if preset["val_every"] else "epoch"
    budget = f", budget {preset['budget_s']:.0f} s of training per run" if preset["budget_s"] else ""
    text = (
        f"- preset: `experiment={preset['experiment']}` with {' '.join(preset['overrides']) or 'no changes'}; "
        f"data: {meta['data']}; evaluation every {every}{budget}\n"
    )
    # What the runs were started with (recorded since LSGD evaluates the average); older results: d2 and signum only.
    used = meta.get("strategy_overrides", {k: list(v[0]) for k, v in STRATEGY_OVERRIDES.items() if k != "lsgd"})
    for name, changes in used.items():
        if any(r.record.strategy == name for r in runs):
            why = STRATEGY_OVERRIDES[name][1] if name in STRATEGY_OVERRIDES else "recorded with the run"
            text += f"- {name} runs with `{' '.join(changes)}` on top of the preset ({why})\n"
    if "strategy_overrides" not in meta and any(r.record.strategy == "lsgd" for r in runs):
        text += "- lsgd evaluates the leader (these runs predate `eval_on=\"average\"`)\n"
    return text


def _draw_errors(axes: Any, runs: list[Run], target: float) -> None:
    by_time, by_step = axes
    for r in runs:
        errors = [p.test_error * 100 for p in r.points]
        by_time.plot([p.train_s for p in r.points], errors, marker=".", label=r.label)
        by_step.plot([p.step for p in r.points], errors, marker=".", label=r.label)
    for axis, xlabel in ((by_time, "training wall-clock time (s, evaluation excluded)"), (by_step, "steps per worker")):
        axis.axhline(target * 100, color="gray", linestyle=":", linewidth=1)
        axis.set_xlabel(xlabel)
        axis.set_ylabel("test error (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)


def _draw_leaders(axes: Any, led: list[Run]) -> None:
    for (timeline, counts), r in zip(axes, led):
        steps, leaders = [x.step for x in r.leaders], [x.leader for x in r.leaders]
        timeline.step(steps, leaders, where="post", linewidth=0.8)
        timeline.plot(steps, leaders, "k.", markersize=3)
        timeline.set_yticks(range(r.record.workers))
        timeline.set_xlabel("step")
        timeline.set_ylabel("leader (worker rank)")
        timeline.set_title(f"{r.label}: leader at each round")
        bars(counts, [str(k) for k in range(r.record.workers)], [(r.led(), {})])
        counts.set_xlabel("worker")
        counts.set_title("rounds led")
