"""Blockwise absmax quantization of flat float tensors to 8 or 4 bits: what Streaming DiLoCo's pseudo-gradients
travel as (:mod:`lsgd_lightning.strategies.streaming_diloco`).

Format of ``n`` values with ``bits`` b in {8, 4} and block size B:

- the values are cut into ``ceil(n / B)`` blocks of B consecutive values (the last one may be shorter);
- each block has a float32 scale ``s = max|x| / L`` with ``L = 2**(b-1) - 1`` (127 for 8 bits, 7 for 4 bits); a block
  of zeros has ``s = 0``;
- each value is the integer ``q = round(x / s)`` in ``[-L, L]`` (round half to even), stored as the unsigned code
  ``q + L`` (one byte per value for 8 bits, two values per byte for 4 bits, the first in the low nibble);
- decoding gives ``(code - L) * s`` in float32.

Error bound: ``|x - decode(encode(x))| <= s / 2 = max|x in its block| / (2 L)`` for every finite value (the scale
itself is rounded to float32, which only matters at the bound's last bits). A non-finite value makes its block's scale
non-finite (NaN or inf), so a diverged worker's payload can be told from its scales alone.

Payload: ``ceil(n * b / 8)`` bytes of codes plus ``4 * ceil(n / B)`` bytes of scales (:func:`payload_bytes`), packed
into one uint8 buffer (:meth:`Quantized.to_bytes`) so that one collective moves both. Lightning-free: torch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

BITS = (8, 4)


def levels(bits: int) -> int:
    """L = 2**(bits-1) - 1: the largest code magnitude (127 for 8 bits, 7 for 4 bits)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    return 2 ** (bits - 1) - 1


def code_bytes(numel: int, bits: int) -> int:
    return math.ceil(numel * bits / 8)


def payload_bytes(numel: int, bits: int, block: int) -> int:
    """Bytes of one quantized payload of ``numel`` values: codes plus float32 scales."""
    return code_bytes(numel, bits) + 4 * math.ceil(numel / block)


@dataclass
class Quantized:
    """``numel`` values as codes (uint8, ``(code_bytes,)``) and per-block scales (float32, ``(ceil(numel/block),)``)."""

    codes: Tensor
    scales: Tensor
    numel: int
    bits: int
    block: int

    def to_bytes(self) -> Tensor:
        """Scales (as raw bytes) then codes, one uint8 tensor of :func:`payload_bytes` bytes."""
        return torch.cat([self.scales.contiguous().view(torch.uint8), self.codes])

    @classmethod
    def from_bytes(cls, buffer: Tensor, numel: int, bits: int, block: int) -> Quantized:
        """The inverse of :meth:`to_bytes` (``buffer``: uint8 of :func:`payload_bytes` bytes)."""
        blocks = math.ceil(numel / block)
        # A copy: inside an all-gather's buffer a payload may start at any byte, and a float32 view needs alignment.
        scales = buffer[: 4 * blocks].clone().view(torch.float32)
        return cls(buffer[4 * blocks :], scales, numel, bits, block)

    @property
    def finite(self) -> bool:
        """Whether every scale is finite, i.e. the encoded values were (one host synchronization)."""
        return bool(torch.isfinite(self.scales).all())


def quantize(x: Tensor, bits: int = 8, block: int = 64) -> Quantized:
    """Encode the flat float tensor ``x`` ``(n,)`` (any float dtype; computed in float32)."""
    limit = levels(bits)
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block!r}")
    values = x.detach().reshape(-1).float()
    numel = values.numel()
    blocks = math.ceil(numel / block)
    padded = torch.zeros(blocks * block, dtype=torch.float32, device=values.device)
    padded[:numel] = values
    grid = padded.view(blocks, block)
    scales = grid.abs().amax(dim=1) / limit
    # A zero block keeps scale 0 (codes 0); a non-finite block gets a non-finite scale, and its codes are junk.
    divisor = torch.where(scales == 0, torch.ones_like(scales), scales)
    q = torch.round(grid / divisor[:, None]).clamp_(-limit, limit).nan_to_num_(0.0)
    codes = (q + limit).to(torch.uint8).reshape(-1)[:numel]
    if bits == 4:
        if numel % 2:
            codes = torch.cat([codes, codes.new_zeros(1)])
        pairs = codes.view(-1, 2)
        codes = pairs[:, 0] | (pairs[:, 1] << 4)
    return Quantized(codes.contiguous(), scales, numel, bits, block)


def dequantize(q: Quantized) -> Tensor:
    """Decode to float32 ``(numel,)``."""
    limit = levels(q.bits)
    codes = q.codes
    if q.bits == 4:
        codes = torch.stack([codes & 0x0F, codes >> 4], dim=1).reshape(-1)
    values = codes[: q.numel].to(torch.float32) - limit
    blocks = math.ceil(q.numel / q.block)
    padded = torch.zeros(blocks * q.block, dtype=torch.float32, device=values.device)
    padded[: q.numel] = values
    return (padded.view(blocks, q.block) * q.scales[:, None]).reshape(-1)[: q.numel]


def error_bound(x: Tensor, bits: int = 8, block: int = 64) -> Tensor:
    """Per value, ``max|x in its block| / (2 L)``: the most :func:`dequantize` of :func:`quantize` can be off."""
    values = x.detach().reshape(-1).float()
    blocks = math.ceil(values.numel() / block)
    padded = torch.zeros(blocks * block, dtype=torch.float32, device=values.device)
    padded[: values.numel()] = values.abs()
    bound = padded.view(blocks, block).amax(dim=1) / (2 * levels(bits))
    return bound.repeat_interleave(block)[: values.numel()]
