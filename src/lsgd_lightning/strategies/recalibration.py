"""BatchNorm re-estimation for an averaged model, and the side-effect-free extra passes it shares with Katyusha X.

The workers' average mixes weights that were trained with different BatchNorm statistics, and the average of those
statistics does not describe the activations of the averaged weights. What the LSGD paper reports is the test error
of the workers' average *after re-estimating* BatchNorm's statistics:

- The authors' code (``codes/worker_dist_optim.py`` ``dist_lsgd_test`` and ``codes/worker_stoc_optim.py``
  ``local_center_test``) all-reduces the workers' parameters (per group when there are groups; buffers are not
  averaged), copies the result into a separate model and, for ResNet and VGG, runs that model in train mode over
  the worker's whole training loader without gradients, with BatchNorm's default momentum (0.1) and without resetting
  the statistics: an exponential average dominated by the last twenty or so batches. Each worker then tests its own
  copy, with its own statistics, on the whole test set.
- :func:`recalibrated` (``bn_recalibration_batches=N``): the average of every worker's parameters and floating-point
  buffers; then every BatchNorm module's running statistics are reset and re-estimated on the first N batches of
  this rank's training shard (a fresh iterator over the Trainer's training DataLoader, so the shard of the current
  epoch) through the user's ``training_step``, in train mode, without gradients, with ``momentum=None`` (the equal-
  weight average of the N batches' statistics), ``self.log`` muted and the random number generator forked; then
  the ranks' re-estimated statistics are averaged (one all-reduce), so every rank evaluates the same model, which the
  sharded validation set and ``sync_dist`` need. Only ``running_mean`` and ``running_var`` change: every other
  buffer (``num_batches_tracked``, anything ``training_step`` updates) keeps the average's value.

Cost: N forward passes of ``training_step`` per evaluation (and per checkpoint and final sync of the average), one
all-reduce of the BatchNorm statistics. A model without BatchNorm (with running statistics) skips all of it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from itertools import islice
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, IterableDataset

from ..core.flat import to_master

if TYPE_CHECKING:
    from .base import ReplicaStrategy


def batch_norms(module: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm modules of ``module`` that keep running statistics (what re-estimation changes)."""
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def average_weights(strategy: ReplicaStrategy, batches: int = 0) -> list[Tensor]:
    """The workers' average, packed like ``strategy.layout`` (a collective): floating-point buckets (parameters and
    floating-point buffers) all-reduced in float32 masters and divided by P, integer buckets this rank's own. With
    ``batches`` > 0 its BatchNorm statistics are then re-estimated on that many of each rank's training batches and
    averaged over the ranks (:func:`recalibrated`), so every rank gets the same model."""
    collectives = strategy.collectives
    average = [
        collectives.all_reduce_sum(to_master(bucket.pack())).div_(strategy.world_size).to(bucket.dtype)
        if bucket.floating
        else bucket.pack()
        for bucket in strategy.layout.buckets
    ]
    return recalibrated(strategy, average, batches) if batches > 0 else average


def recalibrated(strategy: ReplicaStrategy, flats: list[Tensor], batches: int) -> list[Tensor]:
    """``flats`` (packed like ``strategy.layout``, the same on every rank) with BatchNorm statistics re-estimated on
    ``batches`` of each rank's training batches and averaged over the ranks (a collective). The module keeps its own
    weights. Returns ``flats`` unchanged when the model has no BatchNorm statistics or there is no training data."""
    module = strategy.lightning_module
    assert module is not None
    norms = batch_norms(module)
    if not norms or batches == 0:
        return flats
    loader = fresh_training_loader(module.trainer)
    if loader is None:  # the same on every rank: all of them skip the collective
        rank_zero_warn(
            "bn_recalibration_batches: the Trainer has no training data here, so the average is evaluated with the "
            "workers' averaged BatchNorm statistics instead of re-estimated ones."
        )
        return flats
    layout = strategy.layout
    own = layout.pack()
    layout.unpack(flats)
    try:
        reestimate(strategy, module, norms, loader, batches)
        statistics = [s for norm in norms for s in (norm.running_mean, norm.running_var)]
        total = strategy.collectives.all_reduce_sum(torch.cat([to_master(s.reshape(-1)) for s in statistics]))
        total.div_(strategy.world_size)
        with torch.no_grad():
            for stat, part in zip(statistics, total.split([s.numel() for s in statistics])):
                stat.copy_(part.view_as(stat))
        return layout.pack()
    finally:
        layout.unpack(own)


def reestimate(
    strategy: ReplicaStrategy, module: pl.LightningModule, norms: list[_BatchNorm], loader: DataLoader, batches: int
) -> None:
    """Reset ``norms``' running statistics and re-estimate them as the equal-weight average over the first
    ``batches`` batches of ``loader``, run through ``training_step`` in train mode without gradients. Every other
    buffer, the modules' train/eval modes, the BatchNorm momenta, the RNG state and the logged metrics are as before."""
    statistics = [s for norm in norms for s in (norm.running_mean, norm.running_var)]
    modes = [(m, m.training) for m in module.modules()]
    momenta = [norm.momentum for norm in norms]
    devices = [strategy.root_device.index or 0] if strategy.root_device.type == "cuda" else []
    try:
        with (
            buffers_kept(module, leave=statistics),
            logging_muted(module),
            torch.random.fork_rng(devices=devices),  # dropout masks, shuffling samplers, the loader's base seed
            torch.no_grad(),
            strategy.precision_plugin.train_step_context(),
        ):
            module.train()
            for norm in norms:
                norm.reset_running_stats()
                norm.momentum = None  # cumulative: running = mean of the batches' statistics
            for batch_idx, batch in enumerate(islice(loader, batches)):
                module.training_step(strategy.batch_to_device(batch), batch_idx)
    finally:
        for submodule, training in modes:
            submodule.training = training
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum


def fresh_training_loader(trainer: pl.Trainer, user: str = "bn_recalibration_batches") -> DataLoader | None:
    """A new loader over the training DataLoader's dataset and (sharded) batch sampler, or ``None`` without one.

    New, so the fit loop's own iterator (persistent workers included) is never touched; its batches are those of
    the sampler's current epoch. ``user`` names who needs it in the error for anything but one DataLoader.
    """
    loader = trainer.train_dataloader
    if loader is None:
        return None
    if not isinstance(loader, DataLoader):
        raise ValueError(f"{user} needs one training DataLoader (it reads this rank's shard); got {type(loader)}.")
    common = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context if loader.num_workers else None,
    }
    if isinstance(loader.dataset, IterableDataset):
        return DataLoader(loader.dataset, batch_size=loader.batch_size, drop_last=loader.drop_last, **common)
    return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, **common)


@contextmanager
def buffers_kept(module: nn.Module, leave: Collection[Tensor] = ()) -> Iterator[None]:
    """Restore every buffer of ``module`` but those in ``leave`` (by identity) to its value on entry."""
    left = {id(t) for t in leave}
    saved = [(b, b.detach().clone()) for b in module.buffers() if id(b) not in left]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


@contextmanager
def logging_muted(module: pl.LightningModule) -> Iterator[None]:
    """Shadow ``log``/``log_dict`` on this one instance, so the extra passes add nothing to the logged metrics."""
    names = ("log", "log_dict")
    previous = {name: module.__dict__.get(name) for name in names}
    for name in names:
        setattr(module, name, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                delattr(module, name)
            else:
                setattr(module, name, value)
