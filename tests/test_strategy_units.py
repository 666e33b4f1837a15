"""Single-process tests: argument checking, the election rule, the flat layout, registration, Trainer checks."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn

import lsgd_lightning
from lsgd_lightning import DataParallelStrategy, EASGDStrategy, LSGDStrategy
from lsgd_lightning.core.flat import FlatLayout
from lsgd_lightning.core.rules import elect_leader
from lsgd_lightning.strategies.checks import check_eamsgd_optimizer
from tests import models


# ----------------------------------------------------------------------------------------------------------------
# Bad input: a ValueError naming the argument
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"tau": 0}, "tau"),
        ({"tau": 2.5}, "tau"),
        ({"tau": True}, "tau"),
        ({"pull_strength": -0.1}, "pull_strength"),
        ({"pull_strength": 1.5}, "pull_strength"),
        ({"pull_strength": "0.1"}, "pull_strength"),
        ({"leader_window": 0}, "leader_window"),
        ({"eval_on": "center"}, "eval_on"),
        ({"eval_on": "best"}, "eval_on"),
        ({"final_sync": "yes"}, "final_sync"),
        ({"bucket_cap_mb": 0}, "bucket_cap_mb"),
        ({"start_method": "thread"}, "start_method"),
        ({"local_tau": 2}, "local_tau"),
        ({"local_pull_strength": 0.5}, "local_pull_strength"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": "rack"}, "group_size"),
        ({"group_size": 2, "local_tau": 0}, "local_tau"),
        ({"group_size": 2, "tau": 16, "local_tau": 5}, "local_tau"),
        ({"group_size": 2, "local_pull_strength": 2.0}, "local_pull_strength"),
        ({"pull_order": "sequential"}, "pull_order"),  # no groups, no second pull
        ({"group_size": 2, "pull_order": "parallel"}, "pull_order"),
        ({"bn_recalibration_batches": -1, "eval_on": "average"}, "bn_recalibration_batches"),
        ({"bn_recalibration_batches": 2.0, "eval_on": "average"}, "bn_recalibration_batches"),
        ({"bn_recalibration_batches": 4}, "bn_recalibration_batches"),  # the leader is evaluated: nothing to redo
        ({"bn_recalibration_batches": 4, "eval_on": "local"}, "bn_recalibration_batches"),
    ],
)
def test_lsgd_rejects_bad_arguments(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        LSGDStrategy(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"tau": -1}, "tau"),
        ({"beta": 0.0}, "beta"),
        ({"beta": 1.5}, "beta"),
        ({"moving_rate": 1.0}, "moving_rate"),
        ({"moving_rate": 0.0}, "moving_rate"),
        ({"moving_rate": math.nan}, "moving_rate"),
        ({"eval_on": "leader"}, "eval_on"),
        ({"momentum_rule": "nesterov"}, "momentum_rule must be 'optimizer' or 'eamsgd'"),
    ],
)
def test_easgd_rejects_bad_arguments(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        EASGDStrategy(**kwargs)


def test_multi_leader_defaults_and_group_size_must_divide_the_workers() -> None:
    strategy = LSGDStrategy(tau=16, pull_strength=0.2, group_size=3)
    assert strategy.local_tau == 4 and strategy.local_pull_strength == 0.2
    assert LSGDStrategy(tau=6, group_size=2).local_tau == 1  # largest divisor of 6 not above 6 // 4
    strategy._check_world_size(6)
    with pytest.raises(ValueError, match="group_size"):
        strategy._check_world_size(8)


@pytest.mark.parametrize(("local", "global_"), [(0.75, 0.75), (0.5, 0.6), (1.0, 0.1)])
def test_simultaneous_multi_leader_pulls_that_overshoot_are_refused_at_construction(
    local: float, global_: float
) -> None:
    """local_pull_strength + pull_strength > 1: eq. 2 moves a worker beyond both leaders (see test_rules)."""
    with pytest.raises(ValueError, match=r"pull_order='simultaneous'.*local_pull_strength \+ pull_strength <= 1"):
        LSGDStrategy(group_size=2, local_pull_strength=local, pull_strength=global_, pull_order="simultaneous")
    # the same strengths in Algorithm 1's order (the default) are a convex combination: accepted
    strategy = LSGDStrategy(group_size=2, local_pull_strength=local, pull_strength=global_)
    assert strategy.pull_order == "sequential"


def test_simultaneous_multi_leader_pulls_up_to_a_total_of_one_are_accepted() -> None:
    strategy = LSGDStrategy(group_size=2, local_pull_strength=0.25, pull_strength=0.75, pull_order="simultaneous")
    assert strategy.pull_order == "simultaneous"


@pytest.mark.parametrize("group_size", [None, 2])
def test_lsgd_evaluates_the_average_with_optional_batchnorm_reestimation(group_size: int | None) -> None:
    groups = {} if group_size is None else {"group_size": group_size}
    assert "average" in LSGDStrategy.evaluated_models()
    strategy = LSGDStrategy(eval_on="average", bn_recalibration_batches=8, **groups)
    assert (strategy.eval_on, strategy.bn_recalibration_batches) == ("average", 8)
    assert LSGDStrategy(**groups).bn_recalibration_batches == 0


def test_async_lsgd_evaluates_the_average_only_in_algorithm1() -> None:
    from lsgd_lightning import AsyncLSGDStrategy

    strategy = AsyncLSGDStrategy(eval_on="average", bn_recalibration_batches=3)
    assert (strategy.eval_on, strategy.bn_recalibration_batches) == ("average", 3)
    with pytest.raises(ValueError, match="eval_on='average' needs variant='algorithm1'"):
        AsyncLSGDStrategy(variant="board", eval_on="average")
    with pytest.raises(ValueError, match="bn_recalibration_batches"):
        AsyncLSGDStrategy(bn_recalibration_batches=3)


def test_batchnorm_reestimation_is_refused_in_manual_optimization_when_the_trainer_is_set_up() -> None:
    strategy = LSGDStrategy(eval_on="average", bn_recalibration_batches=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    with pytest.raises(ValueError, match="bn_recalibration_batches=2 .*manual optimization"):
        trainer.fit(models.ManualRegressor(), models.train_loader(1))


def test_easgd_refuses_a_center_that_would_overshoot_the_mean() -> None:
    strategy = EASGDStrategy(moving_rate=0.3)
    strategy._check_world_size(3)  # 3 * 0.3 = 0.9 <= 1: fine
    with pytest.raises(ValueError, match=r"world_size \* alpha"):
        strategy._check_world_size(4)  # 4 * 0.3 = 1.2 > 1
    assert EASGDStrategy(beta=0.9).alpha_for(8) == pytest.approx(0.9 / 8)


def test_ddp_wrapper_arguments_are_refused_by_name() -> None:
    with pytest.raises(TypeError, match="find_unused_parameters"):
        LSGDStrategy(find_unused_parameters=True)
    with pytest.raises(TypeError, match="ddp_comm_hook"):
        DataParallelStrategy(ddp_comm_hook=lambda *a: None)


def test_incompatible_trainer_settings_are_refused_when_the_trainer_is_built() -> None:
    """Before any worker process or process group exists."""
    with pytest.raises(ValueError, match="sync_batchnorm"):
        pl.Trainer(accelerator="cpu", devices=2, strategy=LSGDStrategy(), sync_batchnorm=True, logger=False)
    with pytest.raises(ValueError, match="moving_rate=0.5"):
        pl.Trainer(accelerator="cpu", devices=4, strategy=EASGDStrategy(moving_rate=0.5), logger=False)
    with pytest.raises(ValueError, match="group_size"):
        pl.Trainer(accelerator="cpu", devices=4, strategy=LSGDStrategy(group_size=3), logger=False)
    assert not torch.distributed.is_initialized()


# ----------------------------------------------------------------------------------------------------------------
# Election
# ----------------------------------------------------------------------------------------------------------------
def test_election_picks_lowest_score_and_lowest_rank_on_ties() -> None:
    assert elect_leader(torch.tensor([3.0, 1.0, 2.0])) == 1
    assert elect_leader(torch.tensor([2.0, 1.0, 1.0, 1.0])) == 1
    assert elect_leader(torch.tensor([1.0, 1.0])) == 0


def test_election_never_picks_a_non_finite_score() -> None:
    assert elect_leader(torch.tensor([math.nan, 5.0, -math.inf, math.inf])) == 1
    assert elect_leader(torch.tensor([math.nan, math.inf])) is None


def test_local_score_is_the_window_mean_and_inf_when_not_finite() -> None:
    strategy = LSGDStrategy(leader_window=3)
    strategy.parallel_devices = [torch.device("cpu")]  # what the Trainer would set
    assert strategy.local_score() == math.inf  # nothing recorded yet
    for value in (1.0, 2.0):
        strategy._record_loss(torch.tensor(value))
    assert strategy.local_score() == pytest.approx(1.5)  # min(window, seen) = 2 losses
    for value in (3.0, 4.0, 5.0):
        strategy._record_loss({"loss": torch.tensor(value)})
    assert strategy.local_score() == pytest.approx(4.0)  # the last 3
    strategy._record_loss(torch.tensor(math.nan))
    assert strategy.local_score() == math.inf


# ----------------------------------------------------------------------------------------------------------------
# Flat layout
# ----------------------------------------------------------------------------------------------------------------
class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.b = nn.Linear(7, 3).to(torch.float64)
        self.norm = nn.BatchNorm1d(3)


def test_flat_layout_groups_by_dtype_respects_the_cap_and_round_trips() -> None:
    module = Mixed()
    layout = FlatLayout(module, bucket_cap_bytes=64)
    assert all(len({t.dtype for t in b.tensors}) == 1 for b in layout.buckets)
    assert all(b.nbytes <= 64 or len(b.tensors) == 1 for b in layout.buckets)
    assert {b.dtype for b in layout.buckets} == {torch.float32, torch.float64, torch.int64}
    assert sum(b.numel for b in layout.buckets) == sum(t.numel() for t in module.state_dict().values())
    before = {k: v.clone() for k, v in module.state_dict().items()}
    flats = layout.pack()
    with torch.no_grad():
        for t in module.state_dict().values():
            t.zero_()
    layout.unpack(flats)
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert set(layout.named_tensors(flats)) == set(before)


# ----------------------------------------------------------------------------------------------------------------
# Registration and single-worker use
# ----------------------------------------------------------------------------------------------------------------
def test_import_registers_every_name_once() -> None:
    for name, cls, start in [
        ("lsgd", LSGDStrategy, "popen"),
        ("lsgd_spawn", LSGDStrategy, "spawn"),
        ("easgd", EASGDStrategy, "popen"),
        ("easgd_spawn", EASGDStrategy, "spawn"),
        ("dataparallel", DataParallelStrategy, "popen"),
        ("dataparallel_spawn", DataParallelStrategy, "spawn"),
        ("lsgd_multi", LSGDStrategy, "popen"),
        ("lsgd_multi_spawn", LSGDStrategy, "spawn"),
    ]:
        strategy = StrategyRegistry.get(name)
        assert isinstance(strategy, cls) and strategy._start_method == start
        assert getattr(strategy, "group_size", None) == ("node" if "multi" in name else None)
    import importlib

    importlib.reload(lsgd_lightning.strategies)  # a second registration must not raise


def test_trainer_accepts_the_strategy_names() -> None:
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="lsgd", logger=False)
    assert isinstance(trainer.strategy, LSGDStrategy)
    assert trainer.strategy.tau == 16 and trainer.strategy.pull_strength == 0.1


def test_single_worker_trains_as_local_sgd_with_one_warning() -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=LSGDStrategy(tau=2),
        logger=False,
        max_steps=4,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    model = models.Regressor()
    before = model.net.body[0].weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, models.train_loader(1))
    single = [w for w in caught if "single worker" in str(w.message)]
    assert len(single) == 1
    assert trainer.global_step == 4 and trainer.strategy.comm.rounds == 0
    assert not torch.equal(before, model.net.body[0].weight)


# ----------------------------------------------------------------------------------------------------------------
# EAMSGD (momentum_rule="eamsgd") in one process
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"momentum": 0.9}, "nesterov=False"),
        ({"momentum": 1.0, "nesterov": True}, "momentum"),
        ({"momentum": 0.0, "dampening": 0.1}, "dampening"),
        ({"momentum": 0.9, "nesterov": True, "maximize": True}, "maximize"),
    ],
)
def test_eamsgd_refuses_sgd_settings_that_are_not_its_rule(settings: dict, named: str) -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1, **settings)
    with pytest.raises(ValueError, match=f"EASGDStrategy with momentum_rule='eamsgd'.*{named}"):
        check_eamsgd_optimizer("EASGDStrategy", [optimizer])


def test_eamsgd_refuses_other_optimizers_when_the_trainer_is_set_up() -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=EASGDStrategy(momentum_rule="eamsgd"),
        logger=False,
        max_steps=1,
        enable_checkpointing=False,
    )
    with pytest.raises(ValueError, match="nesterov=False"):
        trainer.fit(models.Regressor(), models.train_loader(1))  # SGD momentum 0.9 without Nesterov


def _single_worker_fit(strategy: EASGDStrategy) -> tuple[dict[str, torch.Tensor], int]:
    """The final weights and the number of SGD momentum buffers after 9 steps."""
    torch.manual_seed(0)
    model = models.NesterovRegressor()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        logger=False,
        max_steps=9,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, models.train_loader(1))
    assert trainer.global_step == 9
    return {k: v.detach().clone() for k, v in model.net.state_dict().items()}, len(trainer.optimizers[0].state)


def test_eamsgd_without_rounds_steps_like_torch_nesterov_sgd() -> None:
    """One worker, no rounds: the strategy's own momentum step leaves the model at y = x + δv, exactly where torch's
    Nesterov SGD (which keeps y) would be; the momentum rules differ only in where the elastic force acts."""
    ours, buffers = _single_worker_fit(EASGDStrategy(tau=2, momentum_rule="eamsgd"))
    torch_sgd, torch_buffers = _single_worker_fit(EASGDStrategy(tau=2))
    assert (buffers, torch_buffers) == (0, 4)  # SGD's own step (and its momentum buffers) never ran under EAMSGD
    assert ours.keys() == torch_sgd.keys()
    for key, value in torch_sgd.items():
        torch.testing.assert_close(ours[key], value, msg=key)
    torch.manual_seed(0)
    assert not torch.equal(ours["body.0.weight"], models.NesterovRegressor().net.body[0].weight)
