"""Streaming DiLoCo's fragments and a fragment's pseudo-gradients in flight (Douillard et al. 2025,
arXiv:2501.18512, Sec. 2.2-2.4).

A :class:`Fragment` is a group of consecutive floating-point tensors of the model (parameters and floating buffers,
in the layout's order), read and written as one float32 flat vector. :func:`split_tensors` cuts the tensor sequence
into F contiguous groups of about d / F values each (whole tensors; balanced, so each synchronization moves about
the same number of bytes).

An :class:`InFlightFragment` is one fragment's synchronization while training goes on: every worker quantizes its
pseudo-gradient (:mod:`.quantize`) and all-gathers the payloads as one asynchronous collective (``async_op=True``)
issued from the training thread on a process group of its own, like LSGD's overlapped round
(:mod:`.transfer`); no other thread makes a c10d call. Quantized codes with per-worker scales cannot be summed by the
network, so every worker receives all P payloads and averages them itself in float32, in rank order: every worker
gets the same Δ bit for bit, whatever the backend's reduction order. Lightning-free: torch only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .quantize import Quantized, dequantize, payload_bytes
from .transfer import InFlight


def split_tensors(sizes: Sequence[int], count: int) -> list[list[int]]:
    """Indices of ``sizes`` (numbers of values, in order) cut into ``count`` contiguous non-empty groups, group f
    ending at the first tensor whose cumulative size reaches ``(f + 1) d / count`` (while leaving a tensor for each
    group after it). ``ValueError`` if there are fewer tensors than groups."""
    if count < 1 or count > len(sizes):
        raise ValueError(f"cannot split {len(sizes)} floating-point tensors into {count} fragments")
    total, groups, current, seen = sum(sizes), [], [], 0
    for index, size in enumerate(sizes):
        current.append(index)
        seen += size
        left_tensors, left_groups = len(sizes) - index - 1, count - len(groups) - 1
        if left_groups > 0 and (seen * count >= (len(groups) + 1) * total or left_tensors == left_groups):
            groups.append(current)
            current = []
    groups.append(current)
    return groups


@dataclass(eq=False)
class Fragment:
    """Some of the model's floating-point tensors, with their names and a per-value parameter mask."""

    names: list[str]
    tensors: list[Tensor]
    is_parameter: Tensor  # bool (numel,): False where the value belongs to a floating buffer

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors)

    @torch.no_grad()
    def pack(self) -> Tensor:
        """The fragment's current values as one float32 flat tensor ``(numel,)``."""
        return torch.cat([t.detach().reshape(-1).float() for t in self.tensors])

    @torch.no_grad()
    def unpack(self, flat: Tensor) -> None:
        """Write ``flat`` (float32 ``(numel,)``) into the tensors, each rounded to its own dtype."""
        chunks = flat.split([t.numel() for t in self.tensors])
        torch._foreach_copy_(self.tensors, [c.view_as(t) for c, t in zip(chunks, self.tensors)])


@dataclass(eq=False)
class InFlightFragment(InFlight):
    """A fragment's quantized pseudo-gradients travelling (or arrived) from every worker.

    Attributes:
        index: the fragment's number.
        due: the optimizer step after which its outer step is applied.
        gathered: uint8 ``(P * payload,)``: every rank's payload in rank order (receive buffer until arrived).
        numel, bits, block: the payload's format (:mod:`.quantize`).
    """

    index: int
    due: int
    gathered: Tensor
    numel: int
    bits: int
    block: int
    _works: list[Any] = field(default_factory=list, repr=False)

    @classmethod
    def start(cls, index: int, due: int, payload: Quantized, world_size: int, group: Any) -> InFlightFragment:
        """Post the all-gather of this rank's ``payload`` on ``group`` (every rank of the group calls this)."""
        mine = payload.to_bytes()
        gathered = mine.new_empty(world_size * mine.numel())
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # looked up per call
        work = all_gather(gathered, mine, group=group, async_op=True)
        return cls(index, due, gathered, payload.numel, payload.bits, payload.block, [work])

    def payloads(self) -> list[Quantized]:
        """Every rank's payload, in rank order (waits first)."""
        self.wait()
        size = payload_bytes(self.numel, self.bits, self.block)
        pieces = self.gathered.split(size)
        return [Quantized.from_bytes(piece, self.numel, self.bits, self.block) for piece in pieces]

    def mean(self) -> tuple[Tensor | None, list[bool]]:
        """The average pseudo-gradient over the workers whose payload is finite, summed in float32 in rank order,
        and which ranks those were; ``None`` if no payload is finite."""
        payloads = self.payloads()
        healthy = [payload.finite for payload in payloads]
        total: Tensor | None = None
        for payload, ok in zip(payloads, healthy):
            if ok:
                values = dequantize(payload)
                total = values if total is None else total.add_(values)
        return (None if total is None else total.div_(sum(healthy))), healthy

    def state_dict(self) -> dict[str, Any]:
        """The arrived payloads, on CPU, for a checkpoint shard (waits for the transfer first)."""
        self.wait()
        keys = ("index", "due", "numel", "bits", "block")
        return {"gathered": self.gathered.detach().cpu(), **{key: getattr(self, key) for key in keys}}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], device: torch.device) -> InFlightFragment:
        """An arrived fragment restored from :meth:`state_dict`."""
        ints = (int(state[key]) for key in ("index", "due"))
        return cls(*ints, state["gathered"].to(device), int(state["numel"]), int(state["bits"]), int(state["block"]))
