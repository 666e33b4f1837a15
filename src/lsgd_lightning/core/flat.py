"""Model state as a few contiguous buffers, so a round costs one collective per bucket, not one per tensor.

A :class:`FlatLayout` groups a module's parameters and buffers by (device, dtype) and splits each group into
buckets of at most ``bucket_cap_bytes``. ``pack`` copies a bucket's tensors into one flat tensor; ``unpack``
copies a flat tensor back into them. Floating-point buckets are averaged/mixed by the strategies; integer
buckets (e.g. BatchNorm's ``num_batches_tracked``) are only ever copied.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .rules import leader_pull, squared_distance


@dataclass
class Bucket:
    """Tensors of one device and dtype that travel together as one flat buffer."""

    names: list[str] = field(default_factory=list)
    tensors: list[Tensor] = field(default_factory=list)

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[0].dtype

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    @property
    def floating(self) -> bool:
        return self.dtype.is_floating_point or self.dtype.is_complex

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return self.numel * self.tensors[0].element_size()

    def empty(self) -> Tensor:
        return torch.empty(self.numel, dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def pack(self) -> Tensor:
        return torch.cat([t.detach().reshape(-1) for t in self.tensors])

    @torch.no_grad()
    def unpack(self, flat: Tensor) -> None:
        """Copy ``flat`` into the bucket's tensors (one fused copy; a float32 master is cast to their dtype)."""
        torch._foreach_copy_(self.tensors, self.split(flat))

    def split(self, flat: Tensor) -> list[Tensor]:
        """Views of ``flat`` shaped like this bucket's tensors."""
        chunks = flat.split([t.numel() for t in self.tensors])
        return [chunk.view_as(t) for chunk, t in zip(chunks, self.tensors)]


class FlatLayout:
    """The buckets of a module's parameters and buffers, in a fixed order that every rank shares.

    The layout holds references to the module's tensors, so it sees in-place updates (optimizer steps, BatchNorm
    statistics). Build it after the module has reached its device and precision, and rebuild it if the module's
    tensors are replaced.
    """

    def __init__(self, module: nn.Module, bucket_cap_bytes: int) -> None:
        named: list[tuple[str, Tensor]] = list(module.named_parameters()) + list(module.named_buffers())
        self.buckets: list[Bucket] = []
        open_buckets: dict[tuple[torch.device, torch.dtype], Bucket] = {}
        for name, tensor in named:
            key = (tensor.device, tensor.dtype)
            bucket = open_buckets.get(key)
            if bucket is None or (bucket.nbytes + tensor.numel() * tensor.element_size() > bucket_cap_bytes):
                bucket = Bucket()
                open_buckets[key] = bucket
                self.buckets.append(bucket)
            bucket.names.append(name)
            bucket.tensors.append(tensor)

    @property
    def floating_buckets(self) -> list[Bucket]:
        return [b for b in self.buckets if b.floating]

    def pack(self) -> list[Tensor]:
        return [b.pack() for b in self.buckets]

    def masters(self) -> list[Tensor]:
        """The floating-point buckets packed in master precision (:func:`to_master`: float32 for a half-precision
        model): what the strategies mix, average or hold."""
        return [to_master(b.pack()) for b in self.floating_buckets]

    def unpack(self, flats: Iterable[Tensor]) -> None:
        for bucket, flat in zip(self.buckets, flats):
            bucket.unpack(flat)

    def parameter_masks(self, module: nn.Module) -> list[Tensor]:
        """Per floating-point bucket, a boolean vector that is True where an element belongs to a parameter of
        ``module`` (False: a buffer such as BatchNorm's running statistics)."""
        names = {name for name, _ in module.named_parameters()}
        return [
            torch.cat(
                [
                    torch.full((t.numel(),), name in names, dtype=torch.bool, device=bucket.device)
                    for name, t in zip(bucket.names, bucket.tensors)
                ]
            )
            for bucket in self.floating_buckets
        ]

    def broadcast_(self, src: int, group: object = None) -> None:
        """Every rank takes ``src``'s parameters and buffers, in place (one broadcast per bucket)."""
        for bucket in self.buckets:
            flat = bucket.pack()
            dist.broadcast(flat, src=src, group=group)
            bucket.unpack(flat)

    def named_tensors(self, flats: Iterable[Tensor]) -> dict[str, Tensor]:
        """``{name: tensor}`` for packed ``flats`` (e.g. to build a state dict of another worker's weights)."""
        out: dict[str, Tensor] = {}
        for bucket, flat in zip(self.buckets, flats):
            out.update(zip(bucket.names, bucket.split(flat)))
        return out


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for the half-precision dtypes (float16, bfloat16), else ``dtype`` itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def to_master(flat: Tensor) -> Tensor:
    """A float32 copy of a half-precision (float16, bfloat16) flat tensor, else ``flat`` itself.

    What the strategies mix, average or accumulate (a pull, the center, D²'s previous iterate, Signum's momentum) is
    computed in float32 under ``*-true`` half precisions, and rounded to the model's dtype once when written back:
    in bfloat16 a move smaller than 1/256 of a weight would vanish.
    """
    return flat.to(master_dtype(flat.dtype))


def state_dict_with(module: nn.Module, replacements: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``module.state_dict()`` with the entries in ``replacements`` swapped in (cloned to CPU-safe copies)."""
    state = module.state_dict()
    for key in state:
        if key in replacements:
            state[key] = replacements[key].detach().clone()
    return state


def pull_buckets(buckets: Sequence[Bucket], own: Iterable[Tensor], leader: Iterable[Tensor], strength: float) -> float:
    """The LSGD pull on a whole model: ``x <- x - strength (x - x_leader)`` (:func:`~.rules.leader_pull`) on every
    floating bucket, in float32 masters for a half-precision model; integer buckets take the leader's values.
    ``own`` and ``leader`` are packed like ``buckets``. Returns ``||x - x_leader||`` before the pull (one host read)."""
    squared = torch.zeros((), dtype=torch.float64, device=buckets[0].device)
    for bucket, mine, theirs in zip(buckets, own, leader):
        if bucket.floating:
            mine, theirs = to_master(mine), to_master(theirs)
            squared += squared_distance(mine, theirs)
            bucket.unpack(leader_pull(mine, theirs, strength))
        else:
            bucket.unpack(theirs)
    return math.sqrt(float(squared))
