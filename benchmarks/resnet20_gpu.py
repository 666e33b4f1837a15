"""The paper's ResNet20 comparison (CIFAR-10, 4 workers: LSGD, EASGD, DataParallel) in one short run on one GPU.

    mkdir -p ~/.cache/cifar10 && tar xzf cifar10-jpeg.tar.gz -C ~/.cache/cifar10
    python benchmarks/resnet20_gpu.py --data-root ~/.cache/cifar10        # one GPU, sized for under 8 minutes
    python benchmarks/resnet20_gpu.py --data-root DIR --smoke             # the same path on the CPU, a few steps

The app's ``cifar10_resnet20`` preset (random 28x28 crops with flips, centre crop for testing, batch 128 per worker,
Nesterov SGD with lr 0.1 and weight decay 1e-4, LSGD τ = 16 and λ = 0.1, EASGD τ = 16 and β = 0.9) with its
164-epoch schedule shortened to ``--epochs`` (default 20) and the LR drops at the same fractions (82 and 123 of 164
epochs, i.e. half and three quarters). The 4 workers share the one GPU: each worker process is a "node" with one
device (``Trainer(devices=1, num_nodes=4)``, ``NODE_RANK`` = its rank, all on ``cuda:0``) and the process group is
gloo (``process_group_backend="gloo"``), because NCCL refuses two ranks on the same GPU; gloo takes CUDA tensors for
all-reduce, all-gather and broadcast (through host memory), which is what LSGD, EASGD and DataParallel use. The
runs go through ``benchmarks/reproduce.py`` (preset ``resnet20_1gpu``): the test error of each strategy's evaluated
model after every epoch, against training time and steps, written to ``--out`` with its report.

Short schedules are not the paper's numbers: expect errors above the paper's final ≈9.2% (LSGD) and ≈9.3% (EASGD)
after 164 epochs; what a short run can show is the ordering and the time per epoch. The full-length commands are
printed first (see :func:`full_commands`). Without a GPU (and without ``--smoke``) it prints that and exits 0.

``--smoke`` runs the same code on the CPU with 2 workers, a few steps and tiny batches (the suite's
``tests/test_benchmarks_smoke.py`` does, on a few generated images).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import driver

STRATEGIES = ("lsgd", "easgd", "dataparallel")
FULL_EPOCHS, SHORT_EPOCHS = 164, 20


def full_commands(data_root: str) -> list[str]:
    """The paper-length runs: one app run per strategy (one GPU per worker), and the benchmark's full preset."""
    app = [
        f"lsgd-train experiment=cifar10_resnet20 trainer=gpu data=imagefolder data.root={data_root} "
        f"{' '.join(driver.CIFAR_NORMALIZATION)} workers=4 strategy={name}"
        for name in STRATEGIES
    ]
    benchmark = (
        f"python benchmarks/reproduce.py --preset cifar10_resnet20 --data-root {data_root} --workers 4 "
        f"--strategies {','.join(STRATEGIES)}"
    )
    return [*app, benchmark]


def schedule(epochs: int) -> list[str]:
    """``epochs`` with the LR drops at the preset's fractions (82/164 and 123/164)."""
    drops = sorted({max(1, round(epochs * 82 / FULL_EPOCHS)), max(1, round(epochs * 123 / FULL_EPOCHS))})
    return [f"trainer.max_epochs={epochs}", f"optim.milestones=[{','.join(map(str, drops))}]"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=driver.REPO / ".data", help="folder with train/ and test/")
    parser.add_argument("--epochs", type=int, default=SHORT_EPOCHS)
    parser.add_argument("--strategies", type=driver.str_list, default=",".join(STRATEGIES), help=", ".join(STRATEGIES))
    parser.add_argument("--smoke", action="store_true", help="CPU, 2 workers, a few steps: checks the path only")
    parser.add_argument("--cache-dir", type=Path, default=None, help="decoded-image cache (default: the app's)")
    parser.add_argument("--timeout", type=float, default=300.0, help="collective timeout (s)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "resnet20_gpu")
    parser.add_argument("--work-dir", type=Path, default=None, help="subset symlinks (smoke mode)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    driver.check_known(parser, args.strategies, STRATEGIES, "strategies")
    print("Full-length runs (164 epochs; 4 GPUs, one worker each):")
    for command in full_commands(str(args.data_root)):
        print(f"    {command}")
    forwarded = ["--preset", "resnet20_1gpu", "--data-root", str(args.data_root), "--out", str(args.out)]
    forwarded += ["--strategies", ",".join(args.strategies), "--timeout", f"{args.timeout:g}"]
    forwarded += ["--cache-dir", str(args.cache_dir)] if args.cache_dir else []
    forwarded += ["--work-dir", str(args.work_dir)] if args.work_dir else []
    overrides = schedule(args.epochs)
    if args.smoke:
        forwarded += ["--accelerator", "cpu", "--workers", "2", "--max-steps", "3"]
        overrides += ["data.batch_size=4", "data.eval_batch_size=8", "strategy.tau=2"]
    else:
        import torch

        if not torch.cuda.is_available():
            print("resnet20_gpu: SKIPPED: no CUDA device (use --smoke for the CPU check of the same path).")
            return 0
    import reproduce  # here: it imports Lightning

    where = "2 CPU workers (smoke)" if args.smoke else "4 workers sharing one GPU over gloo"
    print(f"Short run ({args.epochs} epochs, {where}):", flush=True)
    # `strategy.tau` exists in lsgd's and easgd's configs, not in dataparallel's: scoped per strategy
    scoped = [
        f"{s}:{o}" for s in args.strategies for o in overrides if o.startswith("strategy.") and s != "dataparallel"
    ]
    run_args = reproduce.parse([*forwarded, *[o for o in overrides if not o.startswith("strategy.")], *scoped])
    # meta.json records this script's command line; the report is reproduce.py's, from the stored arguments
    driver.run("reproduce", run_args, argv, reproduce.measure, reproduce.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
