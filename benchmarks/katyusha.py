"""Katyusha X against SVRG and SGD on a sum-of-non-convex problem, with 1, 2 and 4 data-parallel workers.

Counts gradient evaluations, not seconds: passes over the data (component gradients / n) until the relative
suboptimality (f(x) − f*)/(f(x_0) − f*) first falls to each target, for every method, worker count P and target,
each method tuned alike (a grid of step sizes, the same for all; Katyusha X also a grid of τ, and separately τ from
the paper's formula), averaged over seeds. Problem and simulator: ``benchmarks/_katyusha_problem.py`` (one
shift-and-invert PCA system: every component non-convex, the average strongly convex). P workers with b samples each
are simulated exactly as one mini-batch of P·b; one small real run of ``KatyushaXStrategy`` on P=2 gloo workers
(a local job, :func:`lsgd_lightning.local_job.run_local_job`) checks that the strategy produces the simulator's
iterates.

Speed-up in parallel rounds: a worker evaluates 1/P of the gradients, so the parallel cost is passes / P and the
speed-up at P is P · passes(1) / passes(P) (linear when the passes do not grow with P).

    python benchmarks/katyusha.py                      # about 10 min on 2 busy cores (single-threaded)
    python benchmarks/katyusha.py --gaps 0.01 --workers 1,2 --seeds 1 --max-passes 6 --real-workers 0   # smoke

Writes ``katyusha.csv`` (passes of every method, P and target, with the chosen setting), ``katyusha_curves.csv``
(the suboptimality curve of each chosen setting at the smallest target, geometric mean over the seeds, 4
significant digits: for the plot) and ``meta.json`` (how it was run, the problem's statistics, the real run), then
from those files ``katyusha.md`` (tables, verdicts) and ``katyusha.png``; ``python benchmarks/report.py DIR`` or
``python benchmarks/katyusha.py --report-only DIR`` rewrites the last two.
"""

from __future__ import annotations

import argparse
import math
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

import driver
from _katyusha_problem import Problem, QuadraticSum, Run, make_problem, simulate
from katyusha_report import Point, Row, report

REAL_EPOCHS = 2  # of the real strategy run
REAL_TIMEOUT_S = 120.0  # its collective timeout
REAL_DEADLINE_S = 600.0  # the local job is killed after this


def float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def method_runs(problem: Problem, workers: int, args: argparse.Namespace) -> dict[str, Run]:
    """Every method's run over the whole grid (lr x tau x seed) at this worker count."""
    smoothness = problem.stats()["L_components"]
    lrs = [c / smoothness for c in args.lr_grid]
    seeds = list(range(args.seeds))
    kwargs = {"lrs": lrs, "seeds": seeds, "max_passes": args.max_passes, "stop_at": min(args.targets)}
    return {
        "sgd": simulate(problem, "sgd", workers, args.batch, taus=[None], **kwargs),
        "svrg": simulate(problem, "svrg", workers, args.batch, taus=[None], **kwargs),
        "katyusha_x": simulate(problem, "katyusha_x", workers, args.batch, taus=list(args.tau_grid), **kwargs),
        "katyusha_x_theory": simulate(problem, "katyusha_x", workers, args.batch, taus=["theory"], **kwargs),
    }


def best(run: Run, target: float, seeds: int) -> dict[str, Any]:
    """The (lr, tau) whose mean passes over the seeds to ``target`` is lowest, every seed having settled below it."""
    reached = run.settled(target).view(-1, seeds)
    worst = reached.max(1).values
    mean = torch.where(torch.isfinite(worst), reached.mean(1), torch.inf)
    index = int(mean.argmin())
    lr, tau, _ = run.configs[index * seeds]
    return {"passes": float(mean[index]), "lr": lr, "tau": tau, "config": index}


def curve(run: Run, config: int, seeds: int) -> tuple[list[float], list[float]]:
    """Mean over seeds of one configuration's suboptimality, against passes."""
    values = torch.stack(run.suboptimality)[:, config * seeds : (config + 1) * seeds]
    return run.passes, torch.pow(10.0, values.clamp(min=1e-16).log10().mean(1)).tolist()  # geometric mean


def real_worker(rank: int, world_size: int, settings: dict[str, Any]) -> dict[str, Any] | None:
    """One rank of the real run: KatyushaXStrategy on gloo, float64, the simulator's problem and data order; rank 0
    returns its final x, its step count and the strategy's byte meter."""
    from lsgd_lightning import KatyushaXStrategy  # here: importing the package imports Lightning

    driver.quiet_warnings()
    problem = make_problem(settings["n"], settings["dim"], settings["gap"])
    pl.seed_everything(settings["seed"], verbose=False)  # DistributedSampler(seed=...) as in the simulator
    strategy = KatyushaXStrategy(tau=settings["tau"], timeout=timedelta(seconds=REAL_TIMEOUT_S))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=strategy,
        precision="64-true",
        max_epochs=settings["epochs"],
        **driver.QUIET_TRAINER,
    )
    model = QuadraticSum(problem, settings["lr"])
    trainer.fit(model, DataLoader(TensorDataset(problem.a), batch_size=settings["batch"]))
    if rank != 0:
        return None
    return {"x": model.x.detach().clone(), "steps": strategy.steps, "comm": strategy.comm.state_dict()}


def real_check(problem: Problem, args: argparse.Namespace, lr: float, tau: float) -> dict[str, Any]:
    """The real run on ``args.real_workers`` local processes (one thread each), against the simulator."""
    from lsgd_lightning.local_job import run_local_job

    workers, epochs = args.real_workers, REAL_EPOCHS
    settings = {"n": args.n, "dim": args.dim, "gap": args.gaps[0], "seed": 0, "tau": tau, "lr": lr}
    settings.update(batch=args.batch, epochs=epochs)
    got = run_local_job(real_worker, workers, (settings,), deadline_s=REAL_DEADLINE_S, threads=1)[0]
    steps = epochs * args.n // (workers * args.batch)
    sim = simulate(problem, "katyusha_x", workers, args.batch, [lr], [tau], [0], max_steps=steps)
    assert sim.x is not None
    difference = float((got["x"] - sim.x[0]).norm() / sim.x[0].norm())
    d = args.dim
    return {
        "workers": workers,
        "epochs": epochs,
        "steps": got["steps"],
        "expected_steps": steps,
        "lr": lr,
        "tau": tau,
        "relative_difference": difference,
        "suboptimality_sim": float(sim.suboptimality[-1][0]),
        "bytes": got["comm"]["bytes"],
        "expected_bytes": 8 * d * steps + 8 * (d + 1) * epochs,
    }


def measure(args: argparse.Namespace, meta: dict[str, Any]) -> None:
    """Every gap, worker count and method; writes katyusha.csv and katyusha_curves.csv, and into ``meta`` the
    problems' statistics and the real run."""
    torch.set_num_threads(1)  # tiny tensors: threads only contend (28 ms vs 0.8 ms a step on 2 busy cores)
    rows: list[Row] = []
    points: list[Point] = []
    problems: list[dict[str, Any]] = []
    target = min(args.targets)
    real = None
    for gap in args.gaps:
        problem = make_problem(args.n, args.dim, gap)
        stats = problem.stats()
        problems.append({"gap": gap, **stats})
        one: dict[tuple[str, float], float] = {}
        for workers in args.workers:
            runs = method_runs(problem, workers, args)
            for method, run in runs.items():
                for t in args.targets:
                    chosen = best(run, t, args.seeds)
                    one.setdefault((method, t), chosen["passes"] if workers == 1 else math.nan)
                    base = one[(method, t)]
                    rows.append(
                        Row(
                            gap=gap,
                            method=method,
                            workers=workers,
                            target=t,
                            passes=chosen["passes"],
                            per_worker=chosen["passes"] / workers,
                            speedup=workers * base / chosen["passes"],
                            lr=chosen["lr"],
                            lr_times_L=chosen["lr"] * stats["L_components"],
                            tau=chosen["tau"],
                        )
                    )
                    if t == target and math.isfinite(chosen["passes"]):
                        passes, values = curve(run, chosen["config"], args.seeds)
                        points += [Point(gap, method, workers, p, float(f"{v:.4g}")) for p, v in zip(passes, values)]
            done = [r for r in rows if (r.gap, r.workers, r.target) == (gap, workers, target)]
            print(
                f"gap {gap:g}, P={workers}, passes to {target:g}: "
                + ", ".join(f"{r.method} {r.passes:.1f}" for r in done),
                flush=True,
            )
            if gap == args.gaps[0] and workers == args.real_workers:
                pick = next(r for r in rows[::-1] if r.method == "katyusha_x" and r.target == target)
                if math.isfinite(pick.passes):
                    assert pick.tau is not None  # Katyusha X's
                    real = real_check(problem, args, pick.lr, pick.tau)
    driver.write_rows(args.out / "katyusha.csv", Row, rows)
    driver.write_rows(args.out / "katyusha_curves.csv", Point, points)
    meta["problem"] = problems
    meta["real_run"] = real


def main(argv: list[str] | None = None) -> None:
    parser = driver.parser_for(__doc__)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--gaps", type=float_list, default=[0.01, 0.05], help="λ − λ_max(Σ) = σ; first: main")
    parser.add_argument("--batch", type=int, default=8, help="samples per worker and step (b)")
    parser.add_argument("--workers", type=driver.int_list, default=[1, 2, 4])
    parser.add_argument("--targets", type=float_list, default=[1e-1, 1e-2, 1e-4, 1e-6, 1e-8])
    parser.add_argument("--lr-grid", type=float_list, default=[0.25, 0.5, 1, 2, 4, 8, 16, 32, 64], help="η·L values")
    parser.add_argument("--tau-grid", type=float_list, default=[0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-passes", type=float, default=400.0)
    parser.add_argument("--real-workers", type=int, default=2, help="P of the real strategy run (0: skip it)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "katyusha")
    args = parser.parse_args(argv)
    driver.run("katyusha", args, argv, measure, report)


if __name__ == "__main__":
    main()
