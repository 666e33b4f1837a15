"""The parameter holders of the asynchronous strategies (``lsgd_lightning.core.holder``): what is put is what is
read, exactly, on every rank, through RPC and through the store; held values are copies; the RPC holder's settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lsgd_lightning.core import board as board_module
from lsgd_lightning.core.board import StoreBoard
from lsgd_lightning.core.collectives import CommMeter
from lsgd_lightning.core.health import HealthBoard
from lsgd_lightning.core.holder import check_rpc_options, host_copy
from lsgd_lightning.local_job import run_local_job
from tests.holder_job import _values, after_users_own_agent, exchange

WORLD = 3


@pytest.mark.parametrize("transport", ["rpc", "store"])
def test_every_rank_reads_exactly_what_the_last_writer_put(tmp_path: Path, transport: str) -> None:
    seen = run_local_job(exchange, WORLD, (transport,), deadline_s=180, workdir=tmp_path)
    last_writer = WORLD - 1
    for rank, got in enumerate(seen):
        writer = (rank - 1) % WORLD
        expected = _values(writer)
        assert [t.dtype for t in got[f"after {writer}"]] == [torch.float32, torch.float64]
        for a, b in zip(got[f"after {writer}"], expected):
            assert torch.equal(a, b), (transport, rank, writer)
        assert "holds" in got["wrong size"] and "expected" in got["wrong size"]
        assert got["start warnings"] == [], got["start warnings"]  # e.g. torch's about init_rpc's gloo group
        # after the close every rank still reads the last values put (rank 2's), unchanged by the zero_() above
        for a, b in zip(got["after close"], _values(last_writer)):
            assert torch.equal(a, b), (transport, rank)


def test_host_copy_never_shares_storage() -> None:
    base = torch.arange(10.0)
    view = base[2:6]
    copy = host_copy(view)
    base.zero_()
    assert copy.tolist() == [2.0, 3.0, 4.0, 5.0]
    assert copy.untyped_storage().nbytes() == 4 * 4  # only the view's values travel, not the whole storage


@pytest.mark.parametrize("key", ["init_method", "rpc_timeout"])
def test_rpc_options_may_not_set_what_the_holder_sets(key: str) -> None:
    with pytest.raises(ValueError, match=f"rpc_options may not set \\['{key}'\\]"):
        check_rpc_options({key: 1})
    assert check_rpc_options({"num_worker_threads": 2}) == {"num_worker_threads": 2}
    with pytest.raises(TypeError, match="rpc_options must be a mapping"):
        check_rpc_options([("num_worker_threads", 2)])  # type: ignore[arg-type]


@pytest.mark.parametrize("options", [{"num_worker_thread": 2}, {"num_worker_threads": "two"}])
def test_rpc_options_that_torch_refuses_are_refused_at_once(options: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="are not valid TensorPipeRpcBackendOptions arguments"):
        check_rpc_options(options)


def test_rpc_options_from_a_hydra_config_become_plain_lists_and_dicts() -> None:
    from omegaconf import OmegaConf
    from torch.distributed import rpc

    config = OmegaConf.create({"rpc": {"_transports": ["uv"], "_channels": ["basic"], "num_worker_threads": 2}})
    options = check_rpc_options(config.rpc)
    assert options == {"_transports": ["uv"], "_channels": ["basic"], "num_worker_threads": 2}
    assert type(options["_transports"]) is list
    assert rpc.TensorPipeRpcBackendOptions(**options).num_worker_threads == 2  # torch's binding takes them


class _BrokenHolder:
    """A holder whose transport broke (as when rank 0's process shut its RPC agent down after a failure)."""

    def put(self, name: str, flats: object) -> None:
        raise RuntimeError("pipe closed")

    def get(self, name: str, like: object) -> list[torch.Tensor]:
        raise RuntimeError("pipe closed")

    def close(self, graceful: bool) -> None:
        pass


def _board(store: torch.distributed.Store) -> StoreBoard:
    health = HealthBoard("fit", rank=1, world_size=3, wait_s=1.0, store=store)
    board = StoreBoard("fit/board", 1, 3, 5.0, CommMeter(), torch.device("cpu"), health, store=store)
    board.holder = _BrokenHolder()
    return board


def test_a_broken_transfer_names_the_worker_that_failed() -> None:
    store = torch.distributed.HashStore()
    board = _board(store)
    HealthBoard("fit", rank=2, world_size=3, wait_s=1.0, store=store).report(ValueError("out of memory on rank 2"))
    with pytest.raises(
        RuntimeError,
        match=r"rank 1 was reading 'center' on the board and rank 2 failed with "
        r"ValueError: out of memory on rank 2",
    ) as caught:
        board.get("center", [torch.zeros(2)])
    assert "pipe closed" in str(caught.value.__cause__)


def test_a_broken_transfer_without_a_failed_worker_raises_the_transports_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(board_module, "FAILURE_GRACE_S", 0.1)
    board = _board(torch.distributed.HashStore())
    with pytest.raises(RuntimeError, match="^pipe closed$"):
        board.put("center", [torch.zeros(2)])


def test_without_rpc_the_default_transport_is_refused_and_store_still_works(monkeypatch: pytest.MonkeyPatch) -> None:
    from lsgd_lightning import DownpourStrategy
    from lsgd_lightning.core import holder

    monkeypatch.setattr(holder, "rpc_available", lambda: False)
    with pytest.raises(
        RuntimeError, match="needs torch.distributed.rpc, which this torch build lacks; use weight_transport='store'"
    ):
        DownpourStrategy()
    assert DownpourStrategy(weight_transport="store").weight_transport == "store"


def test_an_rpc_agent_the_user_started_is_named_with_what_to_do(tmp_path: Path) -> None:
    (message,) = run_local_job(after_users_own_agent, 1, deadline_s=60, workdir=tmp_path)
    assert "an RPC agent started outside lsgd_lightning already runs in this process" in message, message
    assert "weight_transport='store'" in message
