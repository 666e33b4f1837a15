"""Streaming DiLoCo (Douillard et al. 2025, arXiv:2501.18512) as a Lightning strategy.

DiLoCo (:mod:`.diloco`) with three changes from the paper:

1. **Fragments** (Sec. 2.2): the floating-point tensors are cut into F contiguous fragments of about d/F values
   (:func:`~lsgd_lightning.core.fragments.split_tensors`), each with its own θ_f and outer optimizer state. Fragment f
   is synchronized after the steps t with t ≡ ⌊f·tau/F⌋ (mod tau) (:func:`~lsgd_lightning.core.rules.fragment_offsets`),
   so each fragment still sees one outer step per ``tau`` steps but the traffic is spread over the interval.
2. **Overlap** (Sec. 2.3): after step t the worker posts its fragment's pseudo-gradient θ_f − θ_{i,f}(t) as an
   asynchronous collective from the training thread and keeps training; after step t + k (``overlap_steps``) it waits
   for it (in the training thread), applies the outer step θ_f ← OuterOpt(θ_f, Δ_f) and merges its fragment, which
   kept training meanwhile, with the new global value: θ_{i,f} ← α θ_{i,f}(t+k) + (1 − α) θ_f
   (:func:`~lsgd_lightning.core.rules.streaming_mix`; α = ``mixing_alpha``, the paper's best is 0.5).
3. **Quantized pseudo-gradients** (Sec. 2.4): each worker sends Δ_{i,f} as 8-bit (or 4-bit) codes with one float32
   scale per ``quantize_block`` values (:mod:`~lsgd_lightning.core.quantize`); the codes are all-gathered and every
   worker averages the P decoded contributions itself in float32, in rank order (the paper also accumulates in
   float32), so θ_f stays identical on every worker whatever the backend's reduction order.

Bytes per synchronization of a fragment of d_f values: each worker sends one payload of ⌈d_f·b/8⌉ + 4·⌈d_f/B⌉
bytes (b bits, blocks of B) and receives all P of them; ``comm/bytes`` counts the receive buffer, P times the payload,
as for every all-gather of the package. Every fragment once per ``tau`` steps: P·(b/8 + 4/B)·d'/tau per step, i.e.
4.25·d'/tau for P = 4 and the default int8 with B = 64, against DiLoCo's 4·d'/tau (an all-reduce buffer, whatever P).
On the wire a ring all-gather moves (P − 1)/P of that buffer per worker and a ring all-reduce 2(P − 1)/P of its
buffer, so per worker and fragment int8 moves (P − 1)·1.0625·d_f bytes against 2(P − 1)·4·d_f/P for a float32
all-reduce: 3.8x less at P = 2, 1.9x less at P = 4, but more from P = 8 on (4 bits: less up to P = 14), since
every worker receives all P payloads. Why codes and an all-gather rather than a bf16 all-reduce: a bf16 all-reduce
would sum in bf16 inside the backend (8 bits of mantissa, rounding at every hop, a result that depends on the
reduction order), while decoding every worker's payload and summing in float32, in rank order, gives every worker
the same Δ bit for bit, as the paper's float32 accumulation.

Evaluation, checkpoints and teardown wait for the transfers in flight first (evaluation and the main checkpoint file
use θ); a shard keeps the arrived payloads and their due steps, so a resume is exact. Fragments in flight when ``fit``
ends are applied then, before the final sync. A worker whose payload is non-finite (diverged) is left out of that
fragment's average and reset to θ with fresh inner optimizer state when the outer step lands.

Fidelity: the paper fragments a transformer by blocks, strided (fragment p holds blocks p, p+F, ...); here fragments
are contiguous runs of whole tensors balanced by size (any model; each synchronization moves about d'/F values). The
paper quantizes to 4-bit floats (E3M0) and reduces in float32; here the codes are linear integers with per-block
scales (8 bits by default, 4 on request) and the float32 reduction happens on every worker after an all-gather (the
payload a worker receives grows with P, where a reduce-scatter would keep it at about 2·payload).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.utilities.types import _PATH
from torch import Tensor
from typing_extensions import override

from ..core.fragments import Fragment, InFlightFragment, split_tensors
from ..core.outer import OuterFactory, OuterModel
from ..core.quantize import payload_bytes, quantize
from ..core.rules import fragment_offsets, pseudo_gradient, squared_distance, streaming_mix
from .checks import check_streaming_options
from .diloco import DiLoCoStrategy
from .metrics import log_rank_local


class StreamingDiLoCoStrategy(DiLoCoStrategy):
    """Streaming DiLoCo: DiLoCo synchronized fragment by fragment at staggered steps, each outer step overlapped with
    ``overlap_steps`` steps of training, pseudo-gradients sent quantized.

    Args:
        tau: steps between two synchronizations of the same fragment (H in the paper).
        fragments: F, the number of fragments (1 <= F <= tau; at most the number of floating-point tensors).
        overlap_steps: k, steps between a fragment's all-gather and its outer step (0 <= k < tau; 0 is blocking).
        mixing_alpha: α in [0, 1], the local weight in the merge α θ_local + (1 − α) θ after the outer step.
        quantize_bits: 8 or 4 bits per value of the pseudo-gradients.
        quantize_block: values per float32 scale (>= 1).
        outer_lr, outer_momentum, nesterov, outer_optimizer: the outer optimizer (one per fragment), as for
            :class:`~.diloco.DiLoCoStrategy`.
        **kwargs: :class:`~.base.ReplicaStrategy` arguments and Lightning's process arguments.

    Raises ``ValueError`` for a bad setting. Registered as ``"streaming_diloco"`` and ``"streaming_diloco_spawn"``.
    """

    strategy_name: ClassVar[str] = "streaming_diloco"

    def __init__(
        self,
        tau: int = 100,
        fragments: int = 4,
        overlap_steps: int = 5,
        mixing_alpha: float = 0.5,
        quantize_bits: int = 8,
        quantize_block: int = 64,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        nesterov: bool = True,
        outer_optimizer: OuterFactory | None = None,
        **kwargs: Any,
    ) -> None:
        check_streaming_options(tau, fragments, overlap_steps, mixing_alpha, quantize_bits, quantize_block)
        super().__init__(tau, outer_lr, outer_momentum, nesterov, outer_optimizer, **kwargs)
        self.fragments, self.overlap_steps, self.mixing_alpha = fragments, overlap_steps, float(mixing_alpha)
        self.quantize_bits, self.quantize_block = quantize_bits, quantize_block
        self.offsets = fragment_offsets(tau, fragments)
        self._fragments: list[Fragment] = []
        self._in_flight: list[InFlightFragment] = []  # in the order they were started
        self._transfer_group: Any = None

    @property
    def fragments_in_flight(self) -> list[int]:
        """The fragments whose pseudo-gradients have been sent and whose outer step has not landed yet."""
        return [item.index for item in self._in_flight]

    @property
    def transfers_running(self) -> bool:
        """Whether a posted all-gather has not been waited for yet."""
        return any(not item.arrived for item in self._in_flight)

    def fragment_bytes(self) -> list[int]:
        """What ``comm/bytes`` counts per synchronization of each fragment: the all-gather's receive buffer, P
        quantized payloads (see the module docstring)."""
        return [
            self.world_size * payload_bytes(f.numel, self.quantize_bits, self.quantize_block) for f in self._fragments
        ]

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if self._transfer_group is None and self.world_size > 1 and dist.is_initialized():
            # Every rank sets up the same Trainer runs, so all of them create this group together.
            self._transfer_group = dist.new_group(timeout=self._timeout)

    @override
    def _new_outers(self) -> list[OuterModel]:
        assert self.lightning_module is not None
        parameters = {name for name, _ in self.lightning_module.named_parameters()}
        named = [(n, t) for b in self.layout.floating_buckets for n, t in zip(b.names, b.tensors)]
        if self.fragments > len(named):
            raise ValueError(
                f"fragments ({self.fragments}) must be at most the model's number of floating-point tensors "
                f"({len(named)}): a fragment is made of whole tensors."
            )
        self._fragments = []
        for group in split_tensors([t.numel() for _, t in named], self.fragments):
            names, tensors = [named[i][0] for i in group], [named[i][1] for i in group]
            masks = [torch.full((t.numel(),), n in parameters, device=t.device) for n, t in zip(names, tensors)]
            self._fragments.append(Fragment(names, tensors, torch.cat(masks)))
        self._in_flight = []
        return [OuterModel([f.pack()], [f.is_parameter], self._outer_factory) for f in self._fragments]

    @override
    def _extra_state_dict(self) -> dict[str, Any]:
        return {**super()._extra_state_dict(), "in_flight": [item.state_dict() for item in self._in_flight]}

    @override
    def _load_extra_state_dict(self, state: Mapping[str, Any]) -> None:
        super()._load_extra_state_dict(state)
        self._in_flight = [InFlightFragment.from_state_dict(s, self.root_device) for s in state.get("in_flight", [])]

    # ------------------------------------------------------------------------------------------------ schedule
    def _starts_at(self, step: int) -> list[int]:
        return [f for f, offset in enumerate(self.offsets) if step % self.tau == offset]

    @override
    def _round_due(self, step: int) -> bool:
        return bool(self._starts_at(step)) or any(item.due <= step for item in self._in_flight)

    @override
    def _communication_round(self) -> dict[str, float] | None:
        metrics = None
        for index in self._starts_at(self._steps):
            metrics = self._start(index)
        for item in [item for item in self._in_flight if item.due <= self._steps]:
            self._land(item, log=True)
        return metrics

    def _start(self, index: int) -> dict[str, float]:
        """Post fragment ``index``'s quantized pseudo-gradient (a NaN payload from a diverged worker)."""
        fragment, theta = self._fragments[index], self._outers[index].flats[0]
        own = fragment.pack()
        difference = pseudo_gradient(theta, own)
        if self.is_diverged():
            difference.fill_(math.nan)
        payload = quantize(difference, self.quantize_bits, self.quantize_block)
        # Counted like every all-gather of the package (Collectives.all_gather): the receive buffer.
        self.comm.count(self.world_size * payload_bytes(payload.numel, payload.bits, payload.block))
        due = self._steps + self.overlap_steps
        self._in_flight.append(InFlightFragment.start(index, due, payload, self.world_size, self._transfer_group))
        return {
            "diloco/fragment": float(index),
            "diloco/dist_to_global": math.sqrt(float(squared_distance(own, theta))),
        }

    def _land(self, item: InFlightFragment, log: bool) -> None:
        """The fragment's outer step, then the merge of this worker's fragment with the new θ_f (or a reset)."""
        self._wait(item)
        self._in_flight.remove(item)
        delta, healthy = item.mean()
        if delta is None:
            self._raise_all_diverged()
        assert delta is not None
        outer, fragment = self._outers[item.index], self._fragments[item.index]
        outer.step([delta])
        metrics = {"diloco/outer_grad_norm": math.sqrt(float(delta.double().square().sum()))}
        if healthy[self.global_rank]:
            fragment.unpack(streaming_mix(fragment.pack(), outer.flats[0], self.mixing_alpha))
        else:
            self._reset_to(self._reference_weights(), "global model")
        metrics["health/resets"] = float(self.resets)
        self.round_metrics.update(metrics)
        if log:
            log_rank_local(self.lightning_module, metrics)

    def _wait(self, item: InFlightFragment) -> None:
        if item.arrived:
            return
        try:
            with self.comm.timed(self.root_device):
                item.wait()
        except BaseException:
            self._in_flight = []
            raise

    def finish_transfer(self) -> None:
        """Wait until every posted all-gather has arrived; the outer steps stay due at their steps."""
        for item in list(self._in_flight):
            self._wait(item)

    @override
    def _reference_weights(self) -> list[Tensor]:
        values: dict[str, Tensor] = {}
        for fragment, outer in zip(self._fragments, self._outers):
            values.update(zip(fragment.names, outer.flats[0].split([t.numel() for t in fragment.tensors])))
        return [
            torch.cat([values[name] for name in bucket.names]).to(bucket.dtype) if bucket.floating else bucket.pack()
            for bucket in self.layout.buckets
        ]

    # ------------------------------------------------------------------------------------------------ lifecycle
    @override
    def _swap_in_reference(self) -> None:
        self.finish_transfer()  # nothing travels beside an evaluation
        super()._swap_in_reference()

    @override
    def on_train_end(self) -> None:
        while self._in_flight:  # fit ended with fragments in flight: land them before the final sync
            self._land(self._in_flight[0], log=False)  # Lightning allows no self.log in on_train_end
        super().on_train_end()

    @override
    def on_exception(self, exception: BaseException) -> None:
        self._in_flight = []  # abandoned: the backend finishes or times out the posted operations on its own
        super().on_exception(exception)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        self.finish_transfer()  # before the checkpoint's own collectives; the shard keeps the pending outer steps
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @override
    def teardown(self) -> None:
        try:
            self.finish_transfer()
        finally:
            super().teardown()
