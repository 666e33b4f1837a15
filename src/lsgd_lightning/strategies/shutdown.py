"""Destroy the job's process groups before the interpreter shuts down, so that a worker that trained exits 0.

A gloo collective runs on one of the process group's C++ threads, which may still hold the collective's tensors a
moment after the caller has been woken. Freeing the last reference to a tensor Python has seen needs the GIL; if
that thread asks for it while the interpreter is finalizing, CPython ends the thread (``pthread_exit``), the forced
unwinding meets a ``noexcept`` destructor and the process aborts ("terminate called without an active exception",
SIGABRT) after all its work. On a loaded machine the thread can be descheduled long enough for that to happen.

Lightning destroys the process group at exit only for NCCL. So every strategy of the package registers
:func:`release_process_groups` with ``atexit`` when it is set up: ``atexit`` functions run while the interpreter is
whole, and destroying a gloo group waits for its collectives and joins its threads with the GIL released.

A group is only destroyed once nothing references it, so strategies that create groups of their own
(``dist.new_group``) are registered as holders and drop their references first (``_release_process_groups``,
``False`` while a collective of theirs is still in flight: destroying would wait for it, up to the timeout).
"""

from __future__ import annotations

import atexit
import weakref
from typing import Protocol

import torch.distributed as dist


class GroupHolder(Protocol):
    def _release_process_groups(self) -> bool:
        """Drop the references to the process groups this object created; ``False``: still in use, keep them."""


_holders: weakref.WeakSet[GroupHolder] = weakref.WeakSet()
_registered = False


def release_process_groups_at_exit(holder: GroupHolder | None = None) -> None:
    """Have :func:`release_process_groups` run at interpreter exit (registered once per process)."""
    global _registered
    if holder is not None:
        _holders.add(holder)
    if not _registered:
        atexit.register(release_process_groups)
        _registered = True


def release_process_groups() -> None:
    """Destroy every process group of this process once no holder still needs its own groups."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for holder in list(_holders):
        if not holder._release_process_groups():
            return
    dist.destroy_process_group()
