"""DiLoCo's global model θ and its outer optimizer (Douillard et al. 2023, arXiv:2311.08105, Algorithm 1).

θ is held as flat tensors in master precision (float32 for a half-precision model, :func:`~.flat.to_master`),
identical on every worker (every worker applies the same outer step to the same averaged pseudo-gradient), wrapped
as ``torch.nn.Parameter`` objects that share their storage, so that any ``torch.optim`` optimizer can step them: its
``.grad`` is the averaged pseudo-gradient Δ on parameters and 0 on floating buffers, which take the workers' average
(:func:`~lsgd_lightning.core.rules.outer_buffers`). One :class:`OuterModel` is the whole model for DiLoCo and one
fragment for Streaming DiLoCo (outer state per fragment). Lightning-free: torch only.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .flat import to_master
from .rules import outer_buffers, outer_gradient

#: What builds the outer optimizer from θ's parameters (e.g. ``functools.partial(torch.optim.SGD, lr=0.7)``).
OuterFactory = Callable[[list[nn.Parameter]], Optimizer]


class OuterModel:
    """θ as flats in master precision (``(n_k,)`` each) with their parameter masks (bool, same shapes) and outer
    optimizer.

    Raises ``ValueError`` if ``factory`` does not return a ``torch.optim.Optimizer``.
    """

    def __init__(self, flats: Sequence[Tensor], is_parameter: Sequence[Tensor], factory: OuterFactory) -> None:
        self.params = [nn.Parameter(to_master(flat.detach()).clone()) for flat in flats]
        self.is_parameter = list(is_parameter)
        self.has_buffers = [not bool(mask.all()) for mask in self.is_parameter]
        self.optimizer = factory(self.params)
        if not isinstance(self.optimizer, Optimizer):
            raise ValueError(
                "outer_optimizer must return a torch.optim.Optimizer for the parameters it is given (e.g. "
                f"functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)), got {self.optimizer!r}."
            )

    @property
    def flats(self) -> list[Tensor]:
        """θ (master-precision flats sharing the parameters' storage; do not modify in place)."""
        return [param.detach() for param in self.params]

    @torch.no_grad()
    def step(self, deltas: Sequence[Tensor]) -> None:
        """One outer step with the averaged pseudo-gradients ``deltas`` (θ's dtypes and shapes)."""
        before = [param.detach().clone() if buffers else None for param, buffers in zip(self.params, self.has_buffers)]
        for param, delta, mask in zip(self.params, deltas, self.is_parameter):
            param.grad = outer_gradient(delta, mask)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for param, old, delta, mask in zip(self.params, before, deltas, self.is_parameter):
            if old is not None:
                param.copy_(outer_buffers(param.detach(), old, delta, mask))

    def state_dict(self) -> dict[str, Any]:
        """θ and the optimizer's state as CPU copies (a snapshot: the optimizer's own state dict holds references
        to the live momentum tensors, which the next step changes in place), for a checkpoint shard."""
        optimizer = {
            "state": {
                key: {name: v.detach().cpu().clone() if torch.is_tensor(v) else v for name, v in values.items()}
                for key, values in self.optimizer.state_dict()["state"].items()
            },
            "param_groups": copy.deepcopy(self.optimizer.state_dict()["param_groups"]),
        }
        return {"flats": [p.detach().cpu().clone() for p in self.params], "optimizer": optimizer}

    def load_state_dict(self, state: Mapping[str, Any], what: str) -> None:
        """Restore :meth:`state_dict`; ``RuntimeError`` naming ``what`` if it does not fit this model."""
        flats = list(state.get("flats") or [])
        if len(flats) != len(self.params) or any(f.numel() != p.numel() for f, p in zip(flats, self.params)):
            raise RuntimeError(f"The checkpoint's {what} does not match this model's parameters.")
        with torch.no_grad():
            for param, flat in zip(self.params, flats):
                param.copy_(flat)
        self.optimizer.load_state_dict(state["optimizer"])
