"""Every validator of the strategies' settings, in one place: a bad value is a ``ValueError`` that names the setting
and what is allowed, raised when the strategy or the Trainer is built (before any process group exists) where the
value is known by then, else when training starts, on every rank alike."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from ..core.collectives import all_gather_single
from ..core.pairing import AD_PSGD_TOPOLOGIES, SCHEDULES


def is_number(value: Any) -> bool:
    """A finite int or float (``bool`` excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def check_fraction(name: str, value: Any) -> None:
    """A number in [0, 1] (pull strengths)."""
    if not is_number(value) or not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}.")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        names = [repr(c) for c in choices]
        allowed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
        raise ValueError(f"{name} must be {allowed}, got {value!r}.")


def check_positive(name: str, value: Any, unit: str = "") -> None:
    if not is_number(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number{unit}, got {value!r}.")


# DDPStrategy arguments that make sense without the DDP wrapper (beside ``timeout`` and ``start_method``).
PROCESS_KWARGS = frozenset(
    {"accelerator", "parallel_devices", "cluster_environment", "checkpoint_io", "precision_plugin"}
    | {"process_group_backend"}
)


def check_process_kwargs(strategy: str, kwargs: Mapping[str, Any]) -> None:
    """``TypeError`` naming every argument a strategy without the DDP wrapper cannot take."""
    unsupported = sorted(set(kwargs) - PROCESS_KWARGS)
    if unsupported:
        raise TypeError(
            f"{strategy} got unsupported argument(s) {', '.join(unsupported)}: it never wraps the model in "
            "DistributedDataParallel, so only these DDPStrategy arguments apply: "
            f"{', '.join(sorted(PROCESS_KWARGS | {'timeout', 'start_method'}))}."
        )


def refuse_sync_batchnorm(strategy: str, layer_sync: Any) -> None:
    """``ValueError`` for ``Trainer(sync_batchnorm=True)`` with a strategy whose workers train their own replicas."""
    if layer_sync is not None:
        raise ValueError(
            f"{strategy} does not support Trainer(sync_batchnorm=True): SyncBatchNorm communicates on every forward "
            "pass, which defeats local training. Use sync_batchnorm=False; each worker then keeps its own BatchNorm "
            "statistics, which the rounds mix like other buffers."
        )


LEADER_BROADCASTS = ("tree", "chain")


GROUP_OPTIONS = ("local_tau", "local_pull_strength", "pull_order")


def check_group_options_need_groups(given: Iterable[str]) -> None:
    """Without ``group_size`` there is one leader: the multi-leader options (``given``: those set) are refused."""
    name = next(iter(given), None)
    if name is not None:
        raise ValueError(f"{name} needs group_size ('node' or an int): without groups there is one leader.")


def check_async_groups(variant: str, group_size: Any, given: Iterable[str]) -> None:
    """Asynchronous LSGD's groups: the local options (``given``: those set) need ``group_size``, and groups need
    the paper's Algorithm 1 (local and global rounds on the job's total step count); the board has one leader."""
    if group_size is None:
        check_group_options_need_groups(given)
    elif variant != "algorithm1":
        raise ValueError(
            f"group_size={group_size!r} needs variant='algorithm1' (local and global rounds on the job's total step "
            f"count), got variant={variant!r}: the board variant keeps one leader copy. Use group_size=None with "
            "variant='board'."
        )


def check_leader_options(
    tau: Any, pull_strength: Any, overlap_steps: Any, leader_broadcast: Any, others: Mapping[str, Any]
) -> None:
    """Leader SGD's settings (``others``: the remaining keyword arguments, where group options do not belong)."""
    check_group_options_need_groups(name for name in GROUP_OPTIONS if name in others)
    check_int("tau", tau, minimum=1)
    check_fraction("pull_strength", pull_strength)
    check_int("overlap_steps", overlap_steps, minimum=0)
    check_choice("leader_broadcast", leader_broadcast, LEADER_BROADCASTS)
    if overlap_steps >= tau:
        raise ValueError(
            f"overlap_steps ({overlap_steps}) must be smaller than tau ({tau}): a round's pull must land before the "
            "next round starts, so that at most one round is in flight."
        )
    if overlap_steps > 0 and leader_broadcast == "chain":
        raise ValueError(
            "overlap_steps > 0 needs leader_broadcast='tree': an overlapped round travels as asynchronous "
            "collectives, and the chain's forwarding cannot run in the background (gloo's point-to-point operations "
            "report no completion until waited for)."
        )


def check_chain_devices(leader_broadcast: str, devices: Sequence[torch.device]) -> None:
    """The chain broadcast moves CPU tensors point to point over gloo: refused on GPUs."""
    if leader_broadcast == "chain" and any(device.type != "cpu" for device in devices):
        raise ValueError(
            "leader_broadcast='chain' sends CPU tensors point to point over gloo; on GPUs use 'tree' (NCCL's "
            "broadcast is already pipelined, and gloo cannot send CUDA tensors point to point)."
        )


def check_point_to_point_backend(strategy: str, devices: Sequence[torch.device], backend: str | None) -> None:
    """gloo cannot send CUDA tensors point to point: refused when the Trainer is built, naming what to use."""
    if backend == "gloo" and any(device.type == "cuda" for device in devices):
        raise ValueError(
            f"{strategy} exchanges weights point to point, which the gloo backend does not support for CUDA "
            "tensors. On GPUs use process_group_backend='nccl' (the default there), or train on CPUs "
            "(accelerator='cpu') with gloo."
        )


def check_multi_leader_options(
    group_size: Any, local_tau: Any, local_pull_strength: Any, overlap_steps: Any, leader_broadcast: Any
) -> None:
    """Multi-leader LSGD's group settings; the overlap and the chain are single-leader options."""
    if overlap_steps != 0 or leader_broadcast != "tree":
        raise ValueError(
            f"overlap_steps={overlap_steps} and leader_broadcast={leader_broadcast!r} need group_size=None: "
            "overlapped rounds and the chain broadcast are single-leader options (multi-leader rounds already keep "
            "most traffic inside the groups)."
        )
    is_count = isinstance(group_size, int) and not isinstance(group_size, bool) and group_size >= 1
    if group_size != "node" and not is_count:
        raise ValueError(f"group_size must be None, 'node' or an integer >= 1, got {group_size!r}.")
    if local_tau is not None:
        check_int("local_tau", local_tau, minimum=1)
    if local_pull_strength is not None:
        check_fraction("local_pull_strength", local_pull_strength)


PULL_ORDERS = ("sequential", "simultaneous")


def check_pull_order(pull_order: Any, local_pull_strength: float, pull_strength: float) -> None:
    """Multi-leader LSGD's order of the two pulls; the simultaneous one (eq. 2) overshoots both leaders when
    local_pull_strength + pull_strength > 1, so it is refused there (the sequential one never overshoots)."""
    check_choice("pull_order", pull_order, PULL_ORDERS)
    total = local_pull_strength + pull_strength
    if pull_order == "simultaneous" and total > 1.0 + 1e-12:
        raise ValueError(
            f"pull_order='simultaneous' needs local_pull_strength + pull_strength <= 1, got "
            f"local_pull_strength={local_pull_strength} + pull_strength={pull_strength} = {total:g}: the rule "
            "x <- x - local_pull_strength (x - x_local) - pull_strength (x - x_global) is then no longer a convex "
            "combination and moves a worker beyond both leaders. Use pull_order='sequential' (the local pull, then "
            "the global pull on its result: a convex combination for any strengths in [0, 1]) or weaker pulls."
        )


def check_bn_recalibration(batches: Any, eval_on: str) -> None:
    """``bn_recalibration_batches``: an int >= 0; above 0 only where the average is evaluated (its statistics are
    what it re-estimates)."""
    check_int("bn_recalibration_batches", batches, minimum=0)
    if batches > 0 and eval_on != "average":
        raise ValueError(
            f"bn_recalibration_batches={batches} re-estimates the BatchNorm statistics of the workers' average, so it "
            f"needs eval_on='average' (got eval_on={eval_on!r}); use bn_recalibration_batches=0 otherwise."
        )


def refuse_manual_recalibration(strategy: str, batches: int, automatic_optimization: bool) -> None:
    """BatchNorm re-estimation runs ``training_step`` without gradients: impossible when it steps optimizers."""
    if batches > 0 and not automatic_optimization:
        raise ValueError(
            f"{strategy}: bn_recalibration_batches={batches} runs training_step to re-estimate BatchNorm statistics, "
            "which manual optimization cannot allow (its training_step steps the optimizers). Use automatic "
            "optimization, or bn_recalibration_batches=0."
        )


def check_elastic_rates(beta: Any, moving_rate: Any) -> tuple[float, float | None]:
    """EASGD's strengths: 0 < beta <= 1 and moving_rate (alpha) None or in (0, 1) (both EASGD forms); returns them
    as floats."""
    if not is_number(beta) or not (0.0 < beta <= 1.0):
        raise ValueError(f"beta must be a number in (0, 1] (alpha = beta / world_size), got {beta!r}.")
    if moving_rate is not None and (not is_number(moving_rate) or not (0.0 < moving_rate < 1.0)):
        raise ValueError(f"moving_rate (alpha) must be a number in (0, 1) or None, got {moving_rate!r}.")
    return float(beta), None if moving_rate is None else float(moving_rate)


def check_adpsgd_options(topology: Any, seed: Any, schedule: Any) -> None:
    """AD-PSGD's settings: its neighbours, the seed of the partners' draws, and the schedule."""
    if topology not in AD_PSGD_TOPOLOGIES:
        raise ValueError(f"AD-PSGD topology must be one of {AD_PSGD_TOPOLOGIES}, got {topology!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}.")
    if schedule not in SCHEDULES:
        raise ValueError(
            f"AD-PSGD schedule must be 'asynchronous' (the paper's: no global step, each active waits only for the "
            f"partner it drew) or 'lockstep' (a deterministic pairing per step), got {schedule!r}."
        )


def check_eamsgd_optimizer(strategy: str, optimizers: Sequence[Optimizer]) -> torch.optim.SGD:
    """EAMSGD (``momentum_rule="eamsgd"``) takes η, δ and λ from one ``torch.optim.SGD`` and steps Nesterov's
    momentum itself: heavy-ball momentum, dampening and maximize are refused by name."""
    algorithm = f"{strategy} with momentum_rule='eamsgd'"
    optimizer = single_sgd(algorithm, optimizers)
    refuse_sgd_setting(
        algorithm,
        optimizer,
        "momentum",
        lambda v: is_number(v) and 0 <= v < 1,
        "EAMSGD's momentum term δ (SGD's momentum) must be in [0, 1); 0 gives plain EASGD.",
    )
    for index, group in enumerate(optimizer.param_groups):
        if group["momentum"] > 0 and not group.get("nesterov"):
            raise ValueError(
                f"{algorithm} does not support SGD nesterov=False with momentum={group['momentum']!r} (param group "
                f"{index}): EAMSGD is Nesterov's momentum (the gradient taken at x + δv). Use nesterov=True (δ = "
                "momentum), or momentum=0 for plain EASGD."
            )
    why = "EAMSGD's velocity is v <- δ v - η g, without dampening; use dampening=0."
    refuse_sgd_setting(algorithm, optimizer, "dampening", lambda v: v == 0, why)
    refuse_sgd_setting(algorithm, optimizer, "maximize", lambda v: not v, "it minimizes the loss.")
    return optimizer


DOWNPOUR_SCALES = ("1/P",)


def check_downpour_options(
    tau: Any, push_every: Any, fetch_every: Any, push_scale: Any
) -> tuple[int, int, float | str]:
    """DOWNPOUR's periods (``tau`` is the period of whichever of the two is not given) and its push scale."""
    check_int("tau", tau, minimum=1)
    push_every = tau if push_every is None else push_every
    fetch_every = tau if fetch_every is None else fetch_every
    check_int("push_every", push_every, minimum=1)
    check_int("fetch_every", fetch_every, minimum=1)
    if push_scale not in DOWNPOUR_SCALES and (not is_number(push_scale) or not (0.0 < push_scale <= 1.0)):
        raise ValueError(f"push_scale must be a number in (0, 1] or '1/P' (1 / world_size), got {push_scale!r}.")
    return push_every, fetch_every, push_scale if isinstance(push_scale, str) else float(push_scale)


def single_sgd(algorithm: str, optimizers: Sequence[Optimizer]) -> torch.optim.SGD:
    """The one ``torch.optim.SGD`` the algorithm runs with, or a ``ValueError`` naming what was given."""
    if len(optimizers) != 1:
        raise ValueError(
            f"{algorithm} runs with exactly one optimizer (one update rule for the whole model), got "
            f"{len(optimizers)}: {', '.join(type(o).__name__ for o in optimizers) or 'none'}."
        )
    optimizer = optimizers[0]
    if not isinstance(optimizer, torch.optim.SGD):
        raise ValueError(
            f"{algorithm} supports torch.optim.SGD only (its update rule is defined for SGD steps), got "
            f"{type(optimizer).__module__}.{type(optimizer).__name__}. Return torch.optim.SGD from "
            "configure_optimizers."
        )
    return optimizer


def refuse_sgd_setting(
    algorithm: str, optimizer: torch.optim.SGD, name: str, allowed: Callable[[Any], bool], why: str
) -> None:
    """``ValueError`` if any param group's ``name`` is not ``allowed``."""
    for index, group in enumerate(optimizer.param_groups):
        value = group.get(name)
        if not allowed(value):
            raise ValueError(f"{algorithm} does not support SGD {name}={value!r} (param group {index}): {why}")


def check_equal_epoch_lengths(batches_per_epoch: float, device: torch.device, strategy_name: str) -> None:
    """Refuse training data whose ranks would take different numbers of steps (a collective would then wait for
    ranks that already left the epoch); warn when the lengths are unknown (an iterable dataset without ``__len__``).

    Called on every rank at the start of training, after the process group exists.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    lengths = torch.empty(dist.get_world_size(), dtype=torch.float64, device=device)
    all_gather_single(lengths, torch.tensor([batches_per_epoch], dtype=torch.float64, device=device))
    values = lengths.tolist()
    if any(math.isinf(v) for v in values):
        if dist.get_rank() == 0:
            warnings.warn(
                f"{strategy_name}: the training data has no length on some ranks (an iterable dataset without "
                "__len__), so nothing guarantees that every rank takes the same number of steps. If one runs out "
                "first, the others wait in a collective until the timeout. Give the dataset a __len__ that is equal "
                "on every rank, or set Trainer(max_steps=...) with data that never runs out.",
                RuntimeWarning,
                stacklevel=2,
            )
        return
    if len(set(values)) > 1:
        per_rank = ", ".join(f"rank {r}: {int(v)}" for r, v in enumerate(values))
        raise ValueError(
            f"{strategy_name}: the ranks' training data have different numbers of batches per epoch ({per_rank}), "
            "so they would take different numbers of optimizer steps and a collective would deadlock. Use a "
            "map-style dataset (Lightning then shards it evenly with a DistributedSampler) or make every rank's "
            "iterable yield the same number of batches."
        )


#: DiLoCo's outer optimizer settings when none is given (the paper's: Nesterov momentum, lr 0.7, momentum 0.9).
OUTER_DEFAULTS = {"outer_lr": 0.7, "outer_momentum": 0.9, "nesterov": True}


def check_outer_options(
    outer_optimizer: Any, outer_lr: Any, outer_momentum: Any, nesterov: Any
) -> Callable[[list[torch.nn.Parameter]], Optimizer]:
    """DiLoCo's outer optimizer: ``outer_optimizer`` (a callable ``params -> Optimizer``, e.g. Hydra's
    ``_partial_: true``) or ``torch.optim.SGD`` built from ``outer_lr``, ``outer_momentum``, ``nesterov``; both at
    once is refused unless those three keep their defaults. Returns the factory."""
    given = {"outer_lr": outer_lr, "outer_momentum": outer_momentum, "nesterov": nesterov}
    if outer_optimizer is not None:
        if not callable(outer_optimizer):
            raise ValueError(
                "outer_optimizer must be a callable that builds a torch.optim.Optimizer from a list of parameters "
                "(e.g. functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True) or Hydra's _partial_), "
                f"got {outer_optimizer!r}."
            )
        changed = {k: v for k, v in given.items() if v != OUTER_DEFAULTS[k]}
        if changed:
            settings = ", ".join(f"{k}={v!r}" for k, v in changed.items())
            raise ValueError(
                f"{settings} conflict(s) with outer_optimizer={outer_optimizer!r}: outer_lr, outer_momentum and "
                "nesterov only build the default SGD. Give these settings to the outer optimizer itself."
            )
        return outer_optimizer
    check_positive("outer_lr", outer_lr)
    if not is_number(outer_momentum) or not (0.0 <= outer_momentum < 1.0):
        raise ValueError(f"outer_momentum must be a number in [0, 1), got {outer_momentum!r}.")
    check_bool("nesterov", nesterov)
    if nesterov and outer_momentum == 0:
        raise ValueError("nesterov=True needs outer_momentum > 0 (Nesterov momentum without momentum is undefined).")
    return functools.partial(torch.optim.SGD, lr=float(outer_lr), momentum=float(outer_momentum), nesterov=nesterov)


def check_streaming_options(
    tau: Any, fragments: Any, overlap_steps: Any, mixing_alpha: Any, quantize_bits: Any, quantize_block: Any
) -> None:
    """Streaming DiLoCo's schedule and codec: 1 <= fragments <= tau (distinct offsets), 0 <= overlap_steps < tau
    (a fragment's outer step lands before its next synchronization), mixing_alpha in [0, 1], 8 or 4 bits."""
    check_int("tau", tau, minimum=1)
    check_int("fragments", fragments, minimum=1)
    check_int("overlap_steps", overlap_steps, minimum=0)
    check_fraction("mixing_alpha", mixing_alpha)
    check_choice("quantize_bits", quantize_bits, (8, 4))
    check_int("quantize_block", quantize_block, minimum=1)
    if fragments > tau:
        raise ValueError(
            f"fragments ({fragments}) must be at most tau ({tau}): fragment f is synchronized at steps "
            "≡ f·tau/fragments (mod tau), and these offsets must differ."
        )
    if overlap_steps >= tau:
        raise ValueError(
            f"overlap_steps ({overlap_steps}) must be smaller than tau ({tau}): a fragment's outer step must land "
            "before the fragment is synchronized again."
        )
