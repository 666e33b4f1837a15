"""One command for what only a GPU can show: ``python benchmarks/gpu_check.py``.

On a machine without CUDA it prints one line saying it was skipped and exits 0. On a machine with a GPU it runs,
in a few minutes, one PASS/FAIL line per check (exit code 1 if any failed):

- ``kernels``: flat buffers (pack, unpack with a dtype cast) and Signum's sign packing on the GPU equal the CPU's;
- ``fit/<strategy>``: a one-rank NCCL fit of every strategy on the GPU (finite weights, on the device);
- ``precision/<p>``: LSGD under ``16-mixed``, ``bf16-mixed`` and ``bf16-true`` (float32 masters, finite weights);
- ``no-host-sync``: ``torch.cuda.set_sync_debug_mode("error")`` around LSGD's steps without a round;
- ``shared-gpu/<strategy>``: 2 ranks sharing the GPU over gloo (CUDA tensors through gloo's all-reduce and
  broadcast) for the collective-based strategies, with rounds on every second step, and ``easgd_async`` (CUDA
  weights to and from the RPC parameter holder);
- ``checkpoint-in-flight``: 2 ranks, LSGD with an overlapped round in flight when the checkpoint is taken, resumed;
- ``hot-path``: milliseconds per pack/unpack/divergence check for a ResNet50-sized model (25.6 M parameters).

``--device cpu`` runs the same checks on the CPU (gloo), as a dry run of this script where no GPU is available; the
suite runs it that way (``tests/test_benchmarks_smoke.py``). Results go to stdout; paste them into RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lsgd_lightning as lsgd
from lsgd_lightning.core.flat import FlatLayout
from lsgd_lightning.core.signs import pack_signs, unpack_signs
from lsgd_lightning.local_job import run_local_job

TIMEOUT = timedelta(seconds=120)
STEPS = 6
# strategy name -> settings that make it communicate often in a short run
SETTINGS: dict[str, dict[str, Any]] = {
    "lsgd": {"tau": 2},
    "lsgd_multi": {"tau": 4, "local_tau": 2, "group_size": 1},
    "easgd": {"tau": 2},
    "dataparallel": {},
    "dpsgd": {},
    "d2": {},
    "adpsgd": {},
    "signum": {},
    "lsgd_async": {"tau": 2},
    "easgd_async": {"tau": 2},
    "downpour": {"tau": 2},
}
# Collectives only (gloo has them for CUDA tensors), and easgd_async: its center through the RPC parameter holder,
# staged through host memory.
SHARED_GPU = ("lsgd", "easgd", "dataparallel", "signum", "easgd_async")


class Classifier(pl.LightningModule):
    """A small classifier with BatchNorm (floating and integer buffers), trained with Nesterov SGD."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 4))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, nesterov=True)


def loader(seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 32, generator=generator)
    return DataLoader(TensorDataset(x, (x[:, :4].argmax(1))), batch_size=32)


def make_strategy(name: str, **extra: Any) -> pl.strategies.Strategy:
    cls = {cls.strategy_name: cls for cls in lsgd.STRATEGIES}[name]
    return cls(**{**SETTINGS.get(name, {}), "timeout": TIMEOUT, **extra})


def fit(
    strategy: pl.strategies.Strategy, device: str, devices: int = 1, ckpt_path: Path | None = None, **kwargs: Any
) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=devices,
        strategy=strategy,
        max_steps=kwargs.pop("max_steps", STEPS),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
    trainer.fit(Classifier(), loader(), ckpt_path=ckpt_path)
    return trainer


def shared_device(device: str) -> dict[str, Any]:
    """Strategy settings for several ranks on one device: gloo on a GPU (NCCL refuses two ranks on one device)."""
    return {"process_group_backend": "gloo"} if device == "cuda" else {}


def finite_on(module: nn.Module, device: str) -> None:
    for name, tensor in module.state_dict().items():
        assert tensor.device.type == device, f"{name} on {tensor.device}"
        assert not tensor.is_floating_point() or torch.isfinite(tensor).all(), f"{name} is not finite"


# ----------------------------------------------------------------------------------------------------------------
# Checks (each returns a short detail string or raises)
# ----------------------------------------------------------------------------------------------------------------
def check_kernels(device: str) -> str:
    model = Classifier().to(device)
    reference = Classifier()
    reference.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    on_device, on_cpu = FlatLayout(model, 1 << 20), FlatLayout(reference, 1 << 20)
    for flat, expected in zip(on_device.pack(), on_cpu.pack()):
        assert torch.equal(flat.cpu(), expected)
    on_device.unpack([flat * 2 for flat in on_device.pack()])
    for name, tensor in model.state_dict().items():
        assert torch.allclose(tensor.cpu().float(), reference.state_dict()[name].float() * 2), name
    values = torch.randn(10_001, generator=torch.Generator().manual_seed(1))
    words = pack_signs(values.to(device))
    assert torch.equal(words.cpu(), pack_signs(values))
    assert torch.equal(unpack_signs(words, values.numel()).cpu(), unpack_signs(pack_signs(values), values.numel()))
    return f"{sum(f.numel() for f in on_cpu.pack())} elements, {values.numel()} signs"


def check_fit(name: str, device: str) -> str:
    trainer = fit(make_strategy(name), device)
    finite_on(trainer.lightning_module, device)
    return f"{trainer.global_step} steps"


def check_precision(precision: str, device: str) -> str:
    trainer = fit(make_strategy("lsgd"), device, precision=precision)
    finite_on(trainer.lightning_module, device)
    masters = trainer.strategy.layout.masters()  # type: ignore[attr-defined]
    assert all(flat.dtype in (torch.float32, torch.float64) or not flat.is_floating_point() for flat in masters)
    return f"{trainer.global_step} steps"


class _NoHostSync(pl.Callback):
    """Host syncs are errors during steps that end without a round (LSGD with tau=4: steps 1-3, 5-7, ...)."""

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if (trainer.global_step + 1) % 4 != 0:
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        torch.cuda.set_sync_debug_mode("default")


def check_no_host_sync(device: str) -> str:
    if device != "cuda":
        return "skipped on CPU (host syncs exist only with a device)"
    try:
        fit(make_strategy("lsgd", tau=4), device, max_steps=8, callbacks=[_NoHostSync()])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return "8 steps, 6 without a round"


def _shared_gpu_worker(rank: int, world_size: int, name: str, device: str) -> float:
    trainer = fit(make_strategy(name, **shared_device(device)), device, devices=world_size)
    finite_on(trainer.lightning_module, device)
    comm = getattr(trainer.strategy, "comm", None)
    return float(comm.bytes) if comm is not None else 0.0


def check_shared_gpu(name: str, device: str, world_size: int) -> str:
    results = run_local_job(_shared_gpu_worker, world_size, (name, device), deadline_s=300)
    return f"{world_size} ranks, bytes sent per rank {results}"


def _checkpoint_worker(rank: int, world_size: int, folder: str, device: str) -> int:
    settings = {"tau": 2, "overlap_steps": 1, **shared_device(device)}
    trainer = fit(make_strategy("lsgd", **settings), device, devices=world_size, max_steps=5)  # round 4 in flight
    path = Path(folder) / "in_flight.ckpt"
    trainer.save_checkpoint(path)
    resumed = fit(make_strategy("lsgd", **settings), device, devices=world_size, ckpt_path=path, max_steps=9)
    finite_on(resumed.lightning_module, device)
    return resumed.global_step


def check_checkpoint_in_flight(device: str, world_size: int) -> str:
    with tempfile.TemporaryDirectory() as folder:
        steps = run_local_job(_checkpoint_worker, world_size, (folder, device), deadline_s=300)
    assert steps == [9] * world_size, steps
    return "saved at step 5 with a round in flight, resumed to step 9"


def check_hot_path(device: str, parameters: int) -> str:
    model = nn.Sequential(*(nn.Linear(1024, 1024) for _ in range(max(1, parameters // (1024 * 1025))))).to(device)
    layout = FlatLayout(model, 25 << 20)

    def timed(fn: Callable[[], Any], repeats: int = 5) -> float:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats * 1000

    flats = layout.pack()
    pack_ms, unpack_ms = timed(layout.pack), timed(lambda: layout.unpack(flats))
    finite_ms = timed(lambda: torch.stack([torch.isfinite(f).all() for f in flats]).all())
    return f"pack {pack_ms:.2f} ms, unpack {unpack_ms:.2f} ms, finite check {finite_ms:.2f} ms per step"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="fewer strategies and a smaller hot-path model")
    parser.add_argument(
        "--checks", default="", help="comma-separated labels or groups, e.g. kernels,fit/lsgd,precision (default: all)"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: SKIPPED: no CUDA device on this machine (nothing was checked; run it on a GPU machine)")
        return 0
    warnings.filterwarnings("ignore")
    names = ("lsgd", "easgd", "lsgd_async") if args.quick else tuple(SETTINGS)
    precisions = ("bf16-mixed",) if args.device == "cpu" else ("16-mixed", "bf16-mixed", "bf16-true")
    checks: list[tuple[str, Callable[[], str]]] = [("kernels", lambda: check_kernels(args.device))]
    checks += [(f"fit/{name}", lambda name=name: check_fit(name, args.device)) for name in names]
    checks += [(f"precision/{p}", lambda p=p: check_precision(p, args.device)) for p in precisions]
    checks += [("no-host-sync", lambda: check_no_host_sync(args.device))]
    shared = SHARED_GPU[:1] if args.quick else SHARED_GPU
    checks += [(f"shared-gpu/{n}", lambda n=n: check_shared_gpu(n, args.device, 2)) for n in shared]
    checks += [("checkpoint-in-flight", lambda: check_checkpoint_in_flight(args.device, 2))]
    size = 2_000_000 if args.quick else 25_600_000
    checks += [("hot-path", lambda: check_hot_path(args.device, size))]
    chosen = [c for c in args.checks.split(",") if c]
    checks = [(label, run) for label, run in checks if not chosen or {label, label.split("/")[0]} & set(chosen)]
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"gpu_check on {device_name}, torch {torch.__version__}, lightning {pl.__version__}", flush=True)
    failed = 0
    for label, check in checks:
        start = time.perf_counter()
        try:
            detail, verdict = check(), "PASS"
        except Exception as error:  # one failing check must not hide the others
            failed += 1
            detail, verdict = f"{type(error).__name__}: {str(error)[:300]}", "FAIL"
            traceback.print_exc(file=sys.stderr)
        print(f"{verdict} {label} ({time.perf_counter() - start:.1f} s): {detail}", flush=True)
    print(f"gpu_check: {len(checks) - failed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
