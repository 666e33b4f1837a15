"""Making every collective wait for live workers first, while workers may be at different steps.

Workers of an asynchronous strategy are at different steps between their meeting points. A collective that
Lightning, torchmetrics or a user's callback runs directly on ``torch.distributed`` (a metric's sync at the end of an
epoch, a ``sync_dist`` log, a barrier) makes a fast worker wait inside it for a slow one and fail after the process
group's timeout, with an error that calls a live, training worker dead. :class:`CollectiveGuard` wraps
``torch.distributed``'s collective functions for that time: a call on the main thread first meets the other workers
at a progress-aware rendezvous (``meet``), which waits for a slow worker as long as it keeps training, and only then
enters the collective. Calls made while the guard is bypassed (the meeting itself) pass straight through.

Code that looks the functions up when it calls them (``torch.distributed.all_gather(...)``, as Lightning and
torchmetrics do) is guarded; a function object imported before the guard was installed is not.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist

COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_reduce",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "monitored_barrier",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "scatter_object_list",
)


class CollectiveGuard:
    """Wraps ``torch.distributed``'s collectives so that each first calls ``meet(description)`` (main thread only).

    Args:
        meet: a rendezvous of all workers; it gets a description of the collective for its error messages.
    """

    def __init__(self, meet: Callable[[str], None]) -> None:
        self.meet = meet
        self._originals: dict[str, Callable[..., Any]] = {}
        self._local = threading.local()

    @property
    def installed(self) -> bool:
        return bool(self._originals)

    def install(self) -> None:
        if self.installed:
            return
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is not None:
                self._originals[name] = original
                setattr(dist, name, self._guarded(name, original))

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals = {}

    @contextmanager
    def bypass(self) -> Iterator[None]:
        """Collectives in the body go straight through (they are the strategy's own, at a meeting point)."""
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            yield
        finally:
            self._local.depth -= 1

    def _guarded(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if getattr(self._local, "depth", 0) or threading.current_thread() is not threading.main_thread():
                return original(*args, **kwargs)
            with self.bypass():
                self.meet(f"torch.distributed.{name} (a sync_dist log, a metric's sync or a callback's collective)")
                return original(*args, **kwargs)

        return guarded
