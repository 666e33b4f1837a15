"""Signs packed 1 bit per coordinate, 32 per int32 word, and the majority vote over packed signs.

Coordinate ``32 * w + k`` of a vector lives in bit ``k`` (least significant first) of word ``w``; the bit is 1 when
the value is ``>= 0`` (positive, +0.0 and -0.0) and 0 when it is negative (NaN also reads as negative). One bit cannot
say "zero", so a zero is sent as +1. The last word is padded with zero bits, which :func:`unpack_signs` drops again
given the original length. Words are plain ``int32`` tensors, so any backend (gloo, NCCL) can move them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .rules import majority_vote

BITS_PER_WORD = 32


def packed_words(numel: int) -> int:
    """Number of int32 words that hold ``numel`` signs."""
    return -(-numel // BITS_PER_WORD)


def _bit_shifts(device: torch.device) -> Tensor:
    return torch.arange(BITS_PER_WORD, dtype=torch.int32, device=device)


def pack_signs(values: Tensor) -> Tensor:
    """The signs of ``values`` (any shape, any real dtype) as ``ceil(numel / 32)`` int32 words."""
    flat = values.detach().reshape(-1)
    bits = (flat >= 0).to(torch.int32)
    padding = packed_words(flat.numel()) * BITS_PER_WORD - flat.numel()
    if padding:
        bits = torch.cat([bits, bits.new_zeros(padding)])
    # Distinct bits never carry, so the int32 sum is the bitwise OR (bit 31 wraps to the sign bit, as intended).
    return (bits.view(-1, BITS_PER_WORD) << _bit_shifts(flat.device)).sum(dim=1, dtype=torch.int32)


def unpack_bits(words: Tensor, numel: int) -> Tensor:
    """The first ``numel`` bits of ``words`` (last dimension: words) as 0/1 ``uint8``; leading dimensions kept."""
    shifts = _bit_shifts(words.device)
    bits = ((words.to(torch.int32).unsqueeze(-1) >> shifts) & 1).to(torch.uint8)
    return bits.reshape(*words.shape[:-1], -1)[..., :numel]


def unpack_signs(words: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_signs`: ``numel`` signs as int8 +1/-1 (a packed zero comes back as +1)."""
    return unpack_bits(words, numel).to(torch.int8) * 2 - 1


def majority_vote_packed(gathered: Tensor, numel: int) -> Tensor:
    """:func:`~.rules.majority_vote` over packed signs: ``gathered`` holds one row of words per worker
    (shape ``(workers, words)``); returns ``numel`` votes as int8 in {-1, 0, +1}."""
    positive = torch.zeros(numel, dtype=torch.int32, device=gathered.device)
    for row in gathered:  # one worker at a time: memory stays O(numel), not O(workers * numel)
        positive += unpack_bits(row, numel)
    return majority_vote(positive, gathered.shape[0])
