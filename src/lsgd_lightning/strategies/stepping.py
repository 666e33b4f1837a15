"""Taking over an optimizer's update while Lightning still runs its ``step(closure)``.

Lightning calls ``optimizer.step(closure)`` through the precision plugin (forward, backward, gradient clipping, the
GradScaler's inf check and hooks all happen in or around that call). A strategy that computes the update itself
(Signum's majority vote, EAMSGD's momentum on x) shadows ``step`` on that one optimizer instance for the call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch.optim import Optimizer


@contextmanager
def replaced_step(optimizer: Optimizer, update: Callable[[], None] | None = None) -> Iterator[None]:
    """Within the block, ``optimizer.step(closure)`` runs the closure (the gradients) and then ``update`` (if given)
    instead of the optimizer's own update, so its state and hyperparameters stay untouched; afterwards the real
    ``step`` is back."""
    previous = optimizer.__dict__.get("step")

    def step(closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        loss = closure() if closure is not None else None
        if update is not None:
            update()
        return loss

    optimizer.step = step  # type: ignore[method-assign]
    try:
        yield
    finally:
        if previous is None:
            del optimizer.step
        else:
            optimizer.step = previous  # type: ignore[method-assign]
