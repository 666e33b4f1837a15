"""Every update rule of ``lsgd_lightning.core.rules`` in one process, against values worked out by hand.

Each test states the rule with small numbers whose result can be checked on paper; a wrong sign, a swapped
argument or a missing term changes the expected value. The layer also imports no Lightning (checked at the end).
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from lsgd_lightning.core import rules

T = torch.tensor


def test_window_score_is_the_mean_and_inf_when_empty_or_not_finite() -> None:
    assert float(rules.window_score(T([1.0, 2.0, 6.0]))) == 3.0
    assert float(rules.window_score(T([]))) == math.inf
    assert float(rules.window_score(T([1.0, math.nan]))) == math.inf
    assert float(rules.window_score(T([1.0, math.inf]))) == math.inf


def test_election_picks_the_lowest_finite_score_and_the_lowest_rank_on_ties() -> None:
    assert rules.elect_leader(T([3.0, 1.0, 2.0])) == 1
    assert rules.elect_leader(T([2.0, 1.0, 1.0])) == 1
    assert rules.elect_leader(T([math.nan, 5.0, -math.inf, math.inf])) == 1
    assert rules.elect_leader(T([math.nan, math.inf])) is None


def test_leader_pull_moves_a_fraction_of_the_way_and_leaves_the_leader_alone() -> None:
    x, leader = T([0.0, 10.0]), T([1.0, 0.0])
    assert rules.leader_pull(x, leader, 0.25).tolist() == [0.25, 7.5]
    assert rules.leader_pull(x, leader, 0.0).tolist() == x.tolist()
    assert rules.leader_pull(x, leader, 1.0).tolist() == leader.tolist()
    assert torch.equal(rules.leader_pull(leader, leader, 0.3), leader)
    assert x.tolist() == [0.0, 10.0]  # pure: the input is untouched


def test_multi_leader_pull_applies_both_forces_from_the_weights_before_the_round() -> None:
    x, local, global_ = T([0.0]), T([1.0]), T([2.0])
    # x - 0.5 (x - 1) - 0.25 (x - 2) = 0.5 + 0.5
    assert rules.multi_leader_pull(x, local, global_, 0.5, 0.25).tolist() == [1.0]
    assert rules.multi_leader_pull(x, local, None, 0.5, 0.25).tolist() == [0.5]
    assert rules.multi_leader_pull(x, None, global_, 0.5, 0.25).tolist() == [0.5]


def test_synchronous_elastic_round_moves_worker_and_center_toward_each_other() -> None:
    # workers at 0, 2, 4 (sum 6), center at 1, alpha 0.1: x_0 = 0 + 0.1 (1 - 0) = 0.1;
    # c = 1 + 0.1 ((0 - 1) + (2 - 1) + (4 - 1)) = 1.3
    x, center = rules.elastic_round(T([0.0]), T([1.0]), T([6.0]), workers=3, alpha=0.1)
    assert x.tolist() == pytest.approx([0.1])
    assert center.tolist() == pytest.approx([1.3])


def test_asynchronous_elastic_exchange_conserves_the_sum() -> None:
    x, center = rules.elastic_exchange(T([3.0]), T([1.0]), alpha=0.25)  # delta = 0.5
    assert (x.tolist(), center.tolist()) == ([2.5], [1.5])


def test_eamsgd_local_step_is_nesterov_momentum_on_the_gradient() -> None:
    # x = 1, v = 0.5, delta = 0.5: the look-ahead y = 1.25; gradient g = 2 (taken at y), lr 0.1, weight decay 0.4:
    # v' = 0.5 * 0.5 - 0.1 (2 + 0.4 * 1.25) = 0.25 - 0.25 = 0; x' = 1 + 0 = 1; y' = 1 + 0.5 * 0 = 1
    x, v, y = rules.eamsgd_local_step(T([1.0]), T([0.5]), T([1.25]), T([2.0]), lr=0.1, momentum=0.5, weight_decay=0.4)
    assert (x.tolist(), v.tolist(), y.tolist()) == (pytest.approx([1.0]), pytest.approx([0.0]), pytest.approx([1.0]))
    # without decay: v' = 0.25 - 0.2 = 0.05; x' = 1.05; y' = 1.05 + 0.025 = 1.075
    x, v, y = rules.eamsgd_local_step(T([1.0]), T([0.5]), T([1.25]), T([2.0]), lr=0.1, momentum=0.5, weight_decay=0.0)
    assert (x.tolist(), v.tolist(), y.tolist()) == (
        pytest.approx([1.05]),
        pytest.approx([0.05]),
        pytest.approx([1.075]),
    )


def test_eamsgd_without_force_is_torch_nesterov_sgd_on_the_look_ahead_point() -> None:
    """torch's Nesterov SGD keeps y = x + delta v (Sutskever's form): with no elastic force the two trajectories of
    y coincide, so the only difference of momentum_rule='eamsgd' is where the force acts."""
    a = T([[2.0, 0.5], [0.5, 1.0]])  # f(y) = 1/2 y^T A y, gradient A y
    y_torch = torch.nn.Parameter(T([1.0, -2.0]))
    sgd = torch.optim.SGD([y_torch], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    x, v, y = T([1.0, -2.0]), torch.zeros(2), T([1.0, -2.0])
    for _ in range(20):
        sgd.zero_grad()
        (0.5 * y_torch @ a @ y_torch).backward()
        sgd.step()
        x, v, y = rules.eamsgd_local_step(x, v, y, a @ y, lr=0.1, momentum=0.9, weight_decay=0.01)
    torch.testing.assert_close(y, y_torch.detach())
    torch.testing.assert_close(y, x + 0.9 * v)


def test_eamsgd_elastic_force_moves_x_and_the_next_gradient_sees_the_old_look_ahead() -> None:
    # eq. 7 with delta = 0.5, lr 0.1, alpha 0.25, one worker and the center c = 0; f(x) = x^2 / 2 (gradient x)
    x, v, y = T([2.0]), T([1.0]), T([2.5])
    force = rules.elastic_round(x, T([0.0]), x.clone(), workers=1, alpha=0.25)[0]  # x - 0.25 (x - 0) = 1.5
    assert force.tolist() == [1.5]
    # the paper: v' = 0.5 * 1 - 0.1 * g(x + 0.5 v) = 0.5 - 0.1 * 2.5 = 0.25; x' = x - alpha (x - c) + v' = 1.75
    x2, v2, y2 = rules.eamsgd_local_step(force, v, y, y, lr=0.1, momentum=0.5, weight_decay=0.0)
    assert (x2.tolist(), v2.tolist(), y2.tolist()) == ([1.75], [0.25], [1.875])
    # torch's Nesterov SGD with the force applied to the weights it holds (y) instead: y - 0.25 y = 1.875, then the
    # gradient at 1.875: a different point (the package's momentum_rule='optimizer')
    assert (y - 0.25 * y).tolist() == [1.875]


def test_downpour_round_pushes_the_accrued_update_and_fetches_the_holder() -> None:
    held, x, baseline = T([10.0, 5.0]), T([3.0, 7.0]), T([1.0, 0.0])
    is_parameter = T([True, False])  # element 1 is a buffer: copied, never summed
    # push and fetch (the EASGD paper's DOWNPOUR): w = 10 + (3 - 1) = 12, the buffer the pusher's 7; x = w; b = w
    w, x2, b = rules.downpour_round(held, x, baseline, is_parameter, push=True, fetch=True)
    assert (w.tolist(), x2.tolist(), b.tolist()) == ([12.0, 7.0], [12.0, 7.0], [12.0, 7.0])
    # push only, scaled by 1/2: w = 10 + 0.5 * 2 = 11; x keeps training from 3; nothing accrued any more (b = x)
    w, x2, b = rules.downpour_round(held, x, baseline, is_parameter, push=True, fetch=False, push_scale=0.5)
    assert (w.tolist(), x2.tolist(), b.tolist()) == ([11.0, 7.0], [3.0, 7.0], [3.0, 7.0])
    # fetch only: x = w = 10 (buffer 5); the accrued 3 - 1 = 2 is kept for the next push: b = 10 - 2 = 8
    w, x2, b = rules.downpour_round(held, x, baseline, is_parameter, push=False, fetch=True)
    assert (w.tolist(), x2.tolist(), b.tolist()) == ([10.0, 5.0], [10.0, 5.0], [8.0, 5.0])
    # ... one more local update of +1 (x = 11), then a push: w = 10 + (11 - 8) = 13, the fetched-over 2 plus the 1
    w, _, _ = rules.downpour_round(w, x2 + T([1.0, 0.0]), b, is_parameter, push=True, fetch=False)
    assert w.tolist() == [13.0, 5.0]


def test_gossip_mix_is_the_weighted_row_of_the_mixing_matrix() -> None:
    mixed = rules.gossip_mix(T([3.0]), 1 / 3, [(1 / 3, T([6.0])), (1 / 3, T([9.0]))])
    assert mixed.tolist() == pytest.approx([6.0])


def test_with_local_step_adds_the_optimizer_step_taken_from_before() -> None:
    assert rules.with_local_step(T([5.0]), before=T([2.0]), after=T([1.5])).tolist() == [4.5]


def test_d2_bracket_corrects_parameters_and_passes_buffers() -> None:
    # parameters: y_t + X_t - y_{t-1} = 1 + 3 - 2 = 2; buffer: as it is after the step
    after, before, previous = T([1.0, 7.0]), T([3.0, 0.0]), T([2.0, 0.0])
    bracket = rules.d2_bracket(after=after, before=before, previous_after=previous, is_parameter=T([True, False]))
    assert bracket.tolist() == [2.0, 7.0]


def test_pair_average_is_the_same_on_both_sides() -> None:
    a, b = torch.randn(100), torch.randn(100)
    assert torch.equal(rules.pair_average(a, b), rules.pair_average(b, a))
    assert rules.pair_average(T([1.0]), T([4.0])).tolist() == [2.5]


def test_signum_momentum_and_step() -> None:
    m = rules.signum_momentum(T([1.0, 1.0]), T([3.0, -1.0]), beta=0.5)
    assert m.tolist() == [2.0, 0.0]
    assert rules.signum_momentum(T([2.0]), None, beta=0.5).tolist() == [1.0]
    # x - lr (vote + wd x) = 2 - 0.1 (1 + 0.5 * 2)
    assert rules.signum_step(T([2.0]), T([1], dtype=torch.int8), lr=0.1, weight_decay=0.5).tolist() == [
        pytest.approx(1.8)
    ]


def test_majority_vote_counts_and_ties() -> None:
    # 3 of 4 workers +1, 2 of 4 (tie), 0 of 4
    assert rules.majority_vote(T([3, 2, 0]), workers=4).tolist() == [1, 0, -1]
    assert rules.majority_vote(T([2, 1]), workers=3).tolist() == [1, -1]


def test_squared_distance_in_float64() -> None:
    assert float(rules.squared_distance(T([1.0, 2.0]), T([4.0, 6.0]))) == 25.0
    assert rules.squared_distance(T([1.0]), T([2.0])).dtype == torch.float64


def test_the_core_layer_imports_no_lightning() -> None:
    code = (
        "import sys, importlib, pkgutil, lsgd_lightning.core as core\n"
        "for m in pkgutil.iter_modules(core.__path__): importlib.import_module('lsgd_lightning.core.' + m.name)\n"
        "bad = [n for n in sys.modules if n.split('.')[0] in ('lightning', 'pytorch_lightning', 'lightning_fabric')]\n"
        "print(bad)\n"
    )
    # ``import lsgd_lightning.core`` would run the package's __init__ (which imports the strategies), so the layer
    # is loaded under an empty parent package.
    out = subprocess.run([sys.executable, "-c", _isolated(code)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def _isolated(code: str) -> str:
    """``code`` run with ``lsgd_lightning`` as an empty namespace package, so only ``core`` itself is imported."""
    return (
        "import sys, types, importlib.util, pathlib\n"
        "spec = importlib.util.find_spec('lsgd_lightning')\n"
        "package = types.ModuleType('lsgd_lightning'); package.__path__ = list(spec.submodule_search_locations)\n"
        "sys.modules['lsgd_lightning'] = package\n" + code
    )
