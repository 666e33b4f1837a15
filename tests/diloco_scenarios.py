"""DiLoCo and Streaming DiLoCo training runs executed inside each worker of a multi-process job.

``run_diloco_scenarios`` saves, per scenario and rank, what ``tests/test_diloco.py`` compares with
``tests/diloco_simulation.py``. The runs reuse the shared scenario helpers (same model, data, seeds, recorder).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lsgd_lightning import DiLoCoStrategy, StreamingDiLoCoStrategy
from lsgd_lightning.core import fragments as fragments_module
from tests import models
from tests.scenarios import TIMEOUT, _fit, _resume_pair, run_scenarios

DILOCO = {"tau": 3, "outer_lr": 0.7, "outer_momentum": 0.9, "nesterov": True}
STREAMING = {
    "tau": 6,
    "fragments": 3,
    "overlap_steps": 1,
    "mixing_alpha": 0.5,
    "quantize_bits": 8,
    "quantize_block": 16,
    "outer_lr": 0.7,
    "outer_momentum": 0.9,
}


def _diloco(**overrides: Any) -> DiLoCoStrategy:
    return DiLoCoStrategy(**{**DILOCO, "final_sync": False, **overrides}, timeout=TIMEOUT)


def _streaming(**overrides: Any) -> StreamingDiLoCoStrategy:
    return StreamingDiLoCoStrategy(**{**STREAMING, "final_sync": False, **overrides}, timeout=TIMEOUT)


def _streaming_with_thread_log(rank: int, world_size: int) -> dict[str, Any]:
    """The streaming run, recording for every posted all-gather and every wait: the thread, the step, async_op."""
    strategy = _streaming()
    log: list[dict[str, Any]] = []
    names = [n for n in ("all_gather_single", "all_gather_into_tensor") if hasattr(dist, n)]
    originals = {n: getattr(dist, n) for n in names}
    original_wait = fragments_module.InFlightFragment.wait

    def recording(name: str) -> Any:
        def gather(*args: Any, **kwargs: Any) -> Any:
            main = threading.current_thread() is threading.main_thread()
            log.append({"op": "post", "main": main, "step": strategy.steps, "async": kwargs.get("async_op", False)})
            return originals[name](*args, **kwargs)

        return gather

    def wait(self: Any) -> None:
        if not self.arrived:
            main = threading.current_thread() is threading.main_thread()
            log.append({"op": "wait", "main": main, "step": strategy.steps, "fragment": self.index})
        original_wait(self)

    for name in names:
        setattr(dist, name, recording(name))
    fragments_module.InFlightFragment.wait = wait  # type: ignore[method-assign]
    try:
        result = _fit(rank, world_size, strategy)
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
        fragments_module.InFlightFragment.wait = original_wait  # type: ignore[method-assign]
    result["log"] = log
    result["fragment_bytes"] = strategy.fragment_bytes()
    return result


def scenario(name: str, rank: int, world_size: int, out: Path) -> dict[str, Any]:
    no_buffers = {"make_model": lambda: models.Regressor(with_buffers=False), "max_steps": 8}
    if name == "diloco":
        return _fit(rank, world_size, _diloco())
    if name == "diloco_diverge":
        return _fit(rank, world_size, _diloco(), make_model=lambda: models.DivergingRegressor(rank=1, step=4))
    if name == "diloco_eval":
        return _fit(rank, world_size, _diloco(), val=True, val_check_interval=3)
    if name == "diloco_final_sync":
        return _fit(rank, world_size, _diloco(final_sync=True), max_steps=12)
    if name == "diloco_resume":
        return _resume_pair(rank, world_size, out, lambda: _diloco(tau=4))
    if name == "bytes_diloco":
        return _fit(rank, world_size, _diloco(tau=4), **no_buffers)
    if name == "streaming":
        return _streaming_with_thread_log(rank, world_size)
    if name == "streaming_diverge":
        return _fit(rank, world_size, _streaming(), make_model=lambda: models.DivergingRegressor(rank=1, step=4))
    if name == "streaming_eval":
        return _fit(rank, world_size, _streaming(), val=True, val_check_interval=3)
    if name == "streaming_resume":
        return _resume_pair(rank, world_size, out, _streaming)
    if name.startswith("bytes_streaming_"):  # bytes_streaming_<bits>
        strategy = _streaming(quantize_bits=int(name.rsplit("_", 1)[1]), tau=4, fragments=2, overlap_steps=0)
        result = _fit(rank, world_size, strategy, **no_buffers)
        result["fragment_bytes"] = strategy.fragment_bytes()
        return result
    raise KeyError(name)


def run_diloco_scenarios(rank: int, world_size: int, out: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    run_scenarios(rank, world_size, out, names, run=scenario)
