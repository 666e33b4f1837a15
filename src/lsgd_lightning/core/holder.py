"""Where the asynchronous strategies keep their shared weights: a parameter holder in the rank-0 process.

The asynchronous strategies (asynchronous EASGD, DOWNPOUR, asynchronous LSGD's board variant) need one-sided
transfers: one worker reads or replaces the shared weights (center, parameters, leader copy) while the others train.
No collective does that. The :class:`~.board.StoreBoard` keeps the lock, the records and the rendezvous on the job's
c10d store; the weights go through one of two holders, both in the rank-0 process, both with
``put(name, flats)`` / ``get(name, like)``:

- :class:`RpcHolder` (``weight_transport="rpc"``, the default): ``torch.distributed.rpc`` (TensorPipe), the
  one-sided transport torch ships. Tensors travel as raw buffers (shared memory or cross-memory attach between
  processes of one machine, TCP between machines); the rank-0 process answers in the RPC agent's threads, which make
  no c10d call. The agent is started on the job's store (no port of its own) and shut down at the end of training.
- :class:`StoreHolder` (``weight_transport="store"``): the weights as values on the store itself, in pieces of at most
  :data:`PIECE_BYTES`, through the store's one server thread. For builds without ``torch.distributed.rpc``.

Measured on one 2-core machine (``benchmarks/store_transfer.py``, RESULTS.md section 8): a ResNet50-sized copy
(102 MB) takes about 0.5 s through the store and about 0.1 s through RPC.

Both hold host (CPU) copies: a CUDA tensor is staged through host memory on its way, and returned on ``like``'s
device. Neither is safe against concurrent use by itself: callers serialize read-modify-write under the board's lock.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlparse

import torch
import torch.distributed as dist
from torch import Tensor

from .collectives import payload_bytes

PIECE_BYTES = 4 << 20  # below the libuv TCPStore's 8 MiB limit per message
WEIGHT_TRANSPORTS = ("rpc", "store")
# RPC settings the holder decides itself (the rendezvous and the default timeout must match the job's store).
_OWN_RPC_OPTIONS = ("init_method", "rpc_timeout")
_FOREIGN_AGENT = (
    "weight_transport='rpc': an RPC agent started outside lsgd_lightning already runs in this process (torch allows "
    "one). Use weight_transport='store', or shut that agent down before fit."
)


class WeightHolder(Protocol):
    """The shared weights of one ``fit`` (see the module docstring)."""

    def put(self, name: str, flats: Sequence[Tensor]) -> None:
        """Replace the tensors held under ``name`` with copies of ``flats``."""

    def get(self, name: str, like: Sequence[Tensor]) -> list[Tensor]:
        """New tensors with the values held under ``name``, with ``like``'s sizes, dtypes and devices."""

    def close(self, graceful: bool) -> None:
        """End of the fit: ``graceful`` (every worker closes at the same point) keeps what is held readable here."""


def host_copy(flat: Tensor) -> Tensor:
    """A compact 1-D CPU tensor with ``flat``'s values, never sharing ``flat``'s storage."""
    flat = flat.detach().reshape(-1)
    return flat.to("cpu", copy=True) if flat.device.type == "cpu" else flat.cpu()


def _to_send(flat: Tensor) -> Tensor:
    """``flat`` as a 1-D CPU tensor that owns exactly its values: RPC sends a tensor's whole storage, and copies it
    on its way anyway, so a compact CPU tensor goes as it is (no extra copy of a whole model)."""
    flat = flat.detach().reshape(-1)
    if flat.device.type != "cpu":
        return flat.cpu()
    compact = flat.storage_offset() == 0 and flat.untyped_storage().nbytes() == payload_bytes(flat)
    return flat if compact else flat.clone()


def _shaped_like(flats: Sequence[Tensor], like: Sequence[Tensor], name: str, copy: bool = True) -> list[Tensor]:
    """``flats`` checked against ``like`` and placed on its devices (``copy=False``: tensors nobody else holds)."""
    if len(flats) != len(like):
        raise RuntimeError(f"the holder's entry {name!r} has {len(flats)} tensors, expected {len(like)}.")
    out = []
    for index, (flat, reference) in enumerate(zip(flats, like)):
        if flat.numel() != reference.numel() or flat.dtype != reference.dtype:
            raise RuntimeError(
                f"the holder's entry {name!r}[{index}] holds {flat.numel()} {flat.dtype} values, expected "
                f"{reference.numel()} {reference.dtype}."
            )
        out.append(flat.to(reference.device, copy=copy))
    return out


class StoreHolder:
    """The weights as values on a c10d store (``weight_transport="store"``), cut into pieces of
    :data:`PIECE_BYTES`; every copy passes through the store's server in the rank-0 process."""

    def __init__(self, store: dist.Store) -> None:
        self.store = store

    def put(self, name: str, flats: Sequence[Tensor]) -> None:
        for index, flat in enumerate(flats):
            data = _to_send(flat).view(torch.uint8).numpy().tobytes()  # tobytes copies
            for piece, start in enumerate(range(0, len(data), PIECE_BYTES)):
                self.store.set(f"t/{name}/{index}/{piece}", data[start : start + PIECE_BYTES])

    def get(self, name: str, like: Sequence[Tensor]) -> list[Tensor]:
        out = []
        for index, reference in enumerate(like):
            nbytes = payload_bytes(reference)
            pieces = [self.store.get(f"t/{name}/{index}/{p}") for p in range(math.ceil(nbytes / PIECE_BYTES))]
            data = b"".join(pieces)
            if len(data) != nbytes:
                raise RuntimeError(f"the holder's entry {name!r}[{index}] holds {len(data)} bytes, expected {nbytes}.")
            flat = torch.empty(reference.numel(), dtype=reference.dtype)
            if nbytes:
                flat.view(torch.uint8).copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            out.append(flat.to(reference.device))
        return out

    def close(self, graceful: bool) -> None:
        """Nothing to stop: the store lives as long as the job's process group."""


# ------------------------------------------------------------------------------------------------ RPC holder
# In the holder's process (rank 0): fit key -> entry name -> tensors. RPC requests run on the agent's threads.
_HELD: dict[str, dict[str, list[Tensor]]] = {}
_HELD_LOCK = threading.Lock()
# Rendezvous of the RPC agent on the job's store: token -> store, read by the handler registered for _SCHEME.
_SCHEME = "lsgd-lightning-store"
_RENDEZVOUS_STORES: dict[str, dist.Store] = {}
_tokens = itertools.count()
_agent_owner: RpcHolder | None = None  # the holder whose RPC agent runs in this process (one agent per process)


def _worker(rank: int) -> str:
    return f"lsgd-lightning-worker-{rank}"


def _hold(key: str, name: str, flats: list[Tensor]) -> None:
    """Holder side of ``put``: replace the entry (never change held tensors in place: a reply may still send them)."""
    with _HELD_LOCK:
        _HELD.setdefault(key, {})[name] = flats


def _give(key: str, name: str) -> list[Tensor]:
    """Holder side of ``get``."""
    with _HELD_LOCK:
        held = _HELD.get(key, {})
        if name not in held:
            raise KeyError(f"the parameter holder has no entry {name!r} for fit {key!r} (nothing was put yet).")
        return held[name]


def _store_rendezvous(url: str, **_: Any) -> Iterator[tuple[dist.Store, int, int]]:
    parsed = urlparse(url)
    query = dict(parse_qsl(parsed.query))
    yield _RENDEZVOUS_STORES.pop(parsed.netloc), int(query["rank"]), int(query["world_size"])


def rpc_available() -> bool:
    """Whether this torch build has ``torch.distributed.rpc`` (TensorPipe)."""
    try:
        from torch.distributed import rpc
    except ImportError:  # pragma: no cover - builds without distributed
        return False
    return bool(rpc.is_available())


def require_rpc() -> None:
    """Raise a RuntimeError that says what to use where this torch build has no ``torch.distributed.rpc``."""
    if not rpc_available():
        raise RuntimeError(
            "weight_transport='rpc' needs torch.distributed.rpc, which this torch build lacks; use "
            "weight_transport='store'."
        )


def check_rpc_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``rpc_options`` as keyword arguments of ``TensorPipeRpcBackendOptions`` (ValueError for what the holder sets)."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"rpc_options must be a mapping of TensorPipeRpcBackendOptions arguments, got {options!r}.")
    own = [key for key in options if key in _OWN_RPC_OPTIONS]
    if own:
        raise ValueError(
            f"rpc_options may not set {own}: the parameter holder starts its RPC agent on the job's store and uses "
            "the strategy's `timeout`. Other TensorPipeRpcBackendOptions arguments (num_worker_threads, "
            "device_maps, _transports, _channels) are allowed."
        )
    plain = {str(key): _plain(value) for key, value in options.items()}
    if plain and rpc_available():  # a misspelt or mistyped argument: say so now, not when the agent starts
        from torch.distributed import rpc

        try:
            rpc.TensorPipeRpcBackendOptions(**plain)
        except TypeError as error:
            raise ValueError(
                f"rpc_options {plain} are not valid TensorPipeRpcBackendOptions arguments: {error}"
            ) from error
    return plain


def _plain(value: Any) -> Any:
    """Lists and dicts for the options' containers (a Hydra config passes its own, which torch's binding refuses)."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(item) for item in value]
    return value


def check_no_foreign_agent() -> None:
    """Raise a RuntimeError if an RPC agent that no :class:`RpcHolder` started runs in this process.

    Checked before the workers meet to start the holder's agent: a worker that cannot start one then fails at the
    meeting point, where the others see its failure, instead of leaving them in ``init_rpc``'s rendezvous, which
    waits for every worker with no timeout of ours.
    """
    from torch.distributed.rpc import api

    if _agent_owner is None and api._is_current_rpc_agent_set():
        raise RuntimeError(_FOREIGN_AGENT)


class RpcHolder:
    """The weights in the rank-0 process, moved by ``torch.distributed.rpc`` (``weight_transport="rpc"``).

    Starting it is a rendezvous of all ``world_size`` workers (every rank constructs one, on the same ``store`` and
    ``key``). Rank 0 reads and writes its own entries directly; the others by ``rpc_sync`` to rank 0, each call
    giving up after ``timeout_s``. :meth:`close` with ``graceful=True`` (every worker at the end of training) first
    copies every entry this worker used, so that the shared model stays readable after the fit (a checkpoint saved or
    a validation run after ``fit``), then shuts the agent down.

    Args:
        key: unique to this fit (the board's prefix).
        rank, world_size: this worker, the number of workers.
        store: the job's c10d store (the agent's rendezvous runs under ``key`` on it).
        timeout_s: seconds a transfer may take before it raises.
        options: further ``TensorPipeRpcBackendOptions`` arguments (:func:`check_rpc_options`).

    Raises:
        RuntimeError: this torch build has no RPC, or an RPC agent not started here already runs in this process.
    """

    holder_rank = 0

    def __init__(
        self,
        key: str,
        rank: int,
        world_size: int,
        store: dist.Store,
        timeout_s: float,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        global _agent_owner
        require_rpc()
        from torch.distributed import rpc

        self.key, self.rank, self.timeout_s = key, rank, timeout_s
        self._names: set[str] = set()
        self._frozen: dict[str, list[Tensor]] | None = None  # after a graceful close: the last values, here
        check_no_foreign_agent()
        if _agent_owner is not None:  # a fit that ended without closing its agent (an error on another rank)
            _agent_owner.close(graceful=False)
        with contextlib.suppress(RuntimeError):  # registered by an earlier fit of this process
            dist.register_rendezvous_handler(_SCHEME, _store_rendezvous)
        token = f"t{next(_tokens)}"
        _RENDEZVOUS_STORES[token] = dist.PrefixStore(f"{key}/rpc/", store)
        # init_rpc sets its rpc_timeout on the store it is given, which passes through to the job's store: keep the
        # store's own timeout there and give every call its own.
        backend = rpc.TensorPipeRpcBackendOptions(
            init_method=f"{_SCHEME}://{token}",
            rpc_timeout=store.timeout.total_seconds(),
            **{"num_worker_threads": 4, **check_rpc_options(options)},
        )
        # No agent runs here now (checked above, our own closed), so init_rpc cannot find one already initialized.
        with warnings.catch_warnings():  # init_rpc's own use of a gloo group (not the user's to act on)
            warnings.filterwarnings("ignore", message="You are using a Backend .* as a ProcessGroup")
            rpc.init_rpc(_worker(rank), rank=rank, world_size=world_size, rpc_backend_options=backend)
        _agent_owner = self

    def put(self, name: str, flats: Sequence[Tensor]) -> None:
        self._check_open()
        self._names.add(name)
        if self.rank == self.holder_rank:
            _hold(self.key, name, [host_copy(flat) for flat in flats])
            return
        from torch.distributed import rpc

        sent = [_to_send(flat) for flat in flats]  # the holder receives its own copies
        rpc.rpc_sync(_worker(self.holder_rank), _hold, args=(self.key, name, sent), timeout=self.timeout_s)

    def get(self, name: str, like: Sequence[Tensor]) -> list[Tensor]:
        self._names.add(name)
        if self._frozen is not None:
            if name not in self._frozen:
                raise RuntimeError(f"the parameter holder of this fit is closed and kept no entry {name!r}.")
            return _shaped_like(self._frozen[name], like, name)
        self._check_open()
        # In the holder's process the held tensors themselves: copy. Elsewhere RPC delivered fresh ones.
        return _shaped_like(self._read(name), like, name, copy=self.rank == self.holder_rank)

    def close(self, graceful: bool) -> None:
        global _agent_owner
        if _agent_owner is not self:
            return
        from torch.distributed import rpc

        try:
            if graceful:  # nothing changes any more: keep the last values for reads after the fit (held tensors
                # are never changed in place, and RPC delivers fresh ones: no copy needed)
                self._frozen = {name: self._read(name) for name in sorted(self._names)}
            # Graceful: waits until every worker got here, so rank 0 serves until the last read is done.
            rpc.shutdown(graceful=graceful, timeout=self.timeout_s)
        except Exception:
            with contextlib.suppress(Exception):  # never leave the agent running: the next fit starts its own
                rpc.shutdown(graceful=False)
            raise
        finally:
            _agent_owner = None
            with _HELD_LOCK:
                _HELD.pop(self.key, None)

    def _read(self, name: str) -> list[Tensor]:
        if self.rank == self.holder_rank:
            return _give(self.key, name)
        from torch.distributed import rpc

        return rpc.rpc_sync(_worker(self.holder_rank), _give, args=(self.key, name), timeout=self.timeout_s)

    def _check_open(self) -> None:
        if _agent_owner is not self:
            raise RuntimeError("the parameter holder of this fit is closed (training ended or failed).")


__all__ = ["PIECE_BYTES", "WEIGHT_TRANSPORTS", "RpcHolder", "StoreHolder", "WeightHolder"]
