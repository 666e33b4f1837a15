"""The NCCL-rules mode (``tests/nccl_rules.py``) under which the suite runs its distributed scenarios: each rule
fails a call that NCCL would not accept, and spawned workers run with the rules installed."""

from __future__ import annotations

import os
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lsgd_lightning.local_job import free_port
from tests import nccl_rules
from tests.multiproc import run_workers
from tests.nccl_rules_job import tags_are_ignored

pytestmark = pytest.mark.skipif(not nccl_rules.enabled(), reason="LSGD_LIGHTNING_EMULATE_NCCL=0: plain gloo run")


@pytest.fixture
def one_rank_group() -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1, timeout=timedelta(seconds=30))
    yield
    dist.destroy_process_group()


def test_the_suite_runs_with_the_rules_installed() -> None:
    assert getattr(dist.all_reduce, "__nccl_rules__", False)
    assert getattr(dist.broadcast, "__nccl_rules__", False)


def test_communication_from_another_thread_is_refused(one_rank_group: None) -> None:
    dist.all_reduce(torch.ones(3))  # the main thread may
    errors: list[BaseException] = []

    def side() -> None:
        try:
            dist.all_reduce(torch.ones(3))
        except BaseException as error:  # noqa: BLE001 - recorded for the assertion
            errors.append(error)

    thread = threading.Thread(target=side, name="side-transfer")
    thread.start()
    thread.join(30)
    assert len(errors) == 1 and isinstance(errors[0], nccl_rules.NCCLRuleViolation)
    assert "side-transfer" in str(errors[0])


def test_non_contiguous_tensors_and_other_devices_are_refused(one_rank_group: None) -> None:
    with pytest.raises(nccl_rules.NCCLRuleViolation, match="non-contiguous"):
        dist.all_reduce(torch.ones(4, 4).t())
    with pytest.raises(nccl_rules.NCCLRuleViolation, match="communication device"):
        dist.broadcast(torch.ones(2, device="meta"), src=0)


def test_point_to_point_is_matched_by_order_not_by_tag(tmp_path: Path) -> None:
    run_workers(tags_are_ignored, 2, (str(tmp_path),), errdir=tmp_path / "errors", timeout_s=120)
    received = torch.load(tmp_path / "rank1.pt")
    assert received["first"].tolist() == [1.0, 1.0] and received["second"].tolist() == [2.0, 2.0]
    assert received["wrapped"], "spawned workers must run under the rules"
