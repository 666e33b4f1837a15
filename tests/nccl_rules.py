"""NCCL's rules enforced on gloo, so that the CPU suite catches what would hang or fail only on GPUs.

With ``LSGD_LIGHTNING_EMULATE_NCCL=1`` in the environment (the suite's default, see ``tests/conftest.py``; set it
to ``0`` to run on plain gloo), every process that imports ``tests`` (the spawned workers and the job scripts do)
wraps ``torch.distributed``'s communication functions so that, under gloo:

- a call from any thread but the main (training) thread raises: NCCL communicators must not be driven from several
  threads without an order, and a second thread's collective can interleave with the training thread's ones
  (Lightning's ``sync_dist``, checkpoint barriers) differently on different ranks, which hangs;
- point-to-point tags are dropped: NCCL ignores them and matches sends and receives by order, so code that relies on
  tags to tell transfers apart would mismatch on NCCL (here it mismatches too, and the test fails or times out);
- every tensor handed to communication must be dense, contiguous and on the process's communication device
  (``LSGD_LIGHTNING_EMULATE_NCCL_DEVICE``, default ``cpu``, the root device of the CPU tests): NCCL reads raw
  device memory and refuses or corrupts anything else.

The wrappers also replace the module globals of ``torch.distributed.distributed_c10d``, so the object collectives
(``broadcast_object_list``, ``all_gather_object``) Lightning uses are checked through the tensor calls they make.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

ENV = "LSGD_LIGHTNING_EMULATE_NCCL"
DEVICE_ENV = "LSGD_LIGHTNING_EMULATE_NCCL_DEVICE"

COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "reduce",
    "gather",
    "scatter",
    "barrier",
    "monitored_barrier",
)
POINT_TO_POINT = ("send", "recv", "isend", "irecv")
_installed = False


class NCCLRuleViolation(RuntimeError):
    """A communication call that NCCL would not accept (or that could hang with NCCL)."""


def enabled() -> bool:
    return os.environ.get(ENV, "0") == "1"


def _tensors(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def check_call(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raise :class:`NCCLRuleViolation` if ``name(*args, **kwargs)`` breaks one of the rules of the module doc."""
    if threading.current_thread() is not threading.main_thread():
        raise NCCLRuleViolation(
            f"torch.distributed.{name} called from thread {threading.current_thread().name!r}: with NCCL, "
            "communication must be issued from the training (main) thread only"
        )
    device = torch.device(os.environ.get(DEVICE_ENV, "cpu"))
    for tensor in _tensors([*args, *kwargs.values()]):
        if tensor.layout != torch.strided or not tensor.is_contiguous():
            shape = tuple(tensor.shape)
            raise NCCLRuleViolation(f"torch.distributed.{name}: a non-contiguous or sparse tensor of shape {shape}")
        if tensor.device.type != device.type:
            raise NCCLRuleViolation(
                f"torch.distributed.{name}: a tensor on {tensor.device}, the communication device is {device}"
            )


def _checked(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        check_call(name, args, kwargs)
        if name in POINT_TO_POINT:
            kwargs.pop("tag", None)  # matched by order, as NCCL does
            args = args[:3]  # (tensor, peer, group): a positional tag is dropped too
        return function(*args, **kwargs)

    wrapper.__nccl_rules__ = True  # type: ignore[attr-defined]
    return wrapper


def _batch(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(p2p_op_list: list[dist.P2POp]) -> Any:
        check_call("batch_isend_irecv", tuple(op.tensor for op in p2p_op_list), {})
        for op in p2p_op_list:
            op.tag = 0  # matched by order, as NCCL does
        return function(p2p_op_list)

    wrapper.__nccl_rules__ = True  # type: ignore[attr-defined]
    return wrapper


def install() -> None:
    """Wrap ``torch.distributed``'s communication functions (idempotent)."""
    global _installed
    if _installed:
        return
    for name in (*COLLECTIVES, *POINT_TO_POINT, "batch_isend_irecv"):
        original = getattr(c10d, name, None)
        if original is None or getattr(original, "__nccl_rules__", False):
            continue
        wrapped = _batch(original) if name == "batch_isend_irecv" else _checked(name, original)
        setattr(c10d, name, wrapped)
        if getattr(dist, name, None) is original:
            setattr(dist, name, wrapped)
    _installed = True


def install_if_enabled() -> None:
    if enabled():
        install()
