"""What makes the strategies correct on GPUs, checked on CPU in one process: settings that cannot work there are
refused when the Trainer is built, half-precision state is kept in float32, loss scaling is not divergence, and the
hot path uses fused operations."""

from __future__ import annotations

import math

import pytest
import torch

import lsgd_lightning
from lsgd_lightning.core.flat import Bucket, FlatLayout, master_dtype, to_master
from lsgd_lightning.core.scores import ScoreWindow

GPUS = [torch.device("cuda", 0), torch.device("cuda", 1)]


def configure(strategy: object, devices: list[torch.device], backend: str | None = None) -> None:
    """What the Trainer does before launching: devices, backend, then ``_configure_launcher``."""
    strategy.parallel_devices = devices  # type: ignore[attr-defined]
    strategy._process_group_backend = backend  # type: ignore[attr-defined]
    strategy._configure_launcher()  # type: ignore[attr-defined]


POINT_TO_POINT = [lsgd_lightning.DPSGDStrategy, lsgd_lightning.D2Strategy, lsgd_lightning.ADPSGDStrategy]


@pytest.mark.parametrize("cls", POINT_TO_POINT)
def test_point_to_point_strategies_refuse_gloo_with_cuda_tensors(cls: type) -> None:
    with pytest.raises(ValueError, match="gloo backend does not support for CUDA.*process_group_backend='nccl'"):
        configure(cls(), GPUS, backend="gloo")


def test_the_chain_broadcast_is_refused_on_gpus() -> None:
    with pytest.raises(ValueError, match="leader_broadcast='chain' sends CPU tensors"):
        configure(lsgd_lightning.LSGDStrategy(leader_broadcast="chain"), GPUS)


def test_half_precision_state_is_float32_and_written_back_in_the_model_dtype() -> None:
    assert master_dtype(torch.bfloat16) == master_dtype(torch.float16) == torch.float32
    assert master_dtype(torch.float64) == torch.float64
    flat = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    assert to_master(flat).dtype == torch.float32
    same = torch.ones(2)
    assert to_master(same) is same  # float32 stays itself: no copy on the common path
    module = torch.nn.Linear(3, 2).to(torch.bfloat16)
    layout = FlatLayout(module, bucket_cap_bytes=1 << 20)
    assert [m.dtype for m in layout.masters()] == [torch.float32]
    # a move far below bfloat16's resolution at 1.0 (2**-7) survives in the float32 master, not in bfloat16
    master = layout.masters()[0].fill_(1.0)
    master.add_(2**-12)
    assert float(master[0]) != 1.0 and float(master.to(torch.bfloat16)[0]) == 1.0
    layout.unpack([master])  # cast once, on the way back into the model
    assert module.weight.dtype == torch.bfloat16


def test_a_non_finite_loss_under_loss_scaling_is_not_divergence() -> None:
    window = ScoreWindow(4, torch.device("cpu"))
    window.record(torch.tensor(math.inf))  # fp16 overflow: the GradScaler skips this step
    weights = [torch.ones(3)]
    assert window.diverged(weights)
    assert not window.diverged(weights, losses=False)
    assert window.diverged([torch.tensor([1.0, math.nan])], losses=False)  # non-finite weights always are
    assert math.isnan(float(window.round_score([torch.tensor([math.inf])], losses=False)))


def test_unpack_is_one_fused_copy_that_casts() -> None:
    bucket = Bucket(["a", "b"], [torch.zeros(2, dtype=torch.bfloat16), torch.zeros(1, 3, dtype=torch.bfloat16)])
    bucket.unpack(torch.arange(5, dtype=torch.float32))
    assert bucket.tensors[0].tolist() == [0.0, 1.0] and bucket.tensors[1].tolist() == [[2.0, 3.0, 4.0]]
