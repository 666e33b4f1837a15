"""Both Lightning namespaces: ``lightning.pytorch`` and the standalone ``pytorch_lightning`` package.

The strategy classes exist once per namespace (``lsgd_lightning.X`` and ``lsgd_lightning.pytorch_lightning.X``, the
same source), every name is registered in both registries, and a Trainer, LightningCLI or Hydra of either namespace
finds them. Real 2-worker jobs run in subprocesses (``tests/pl_job.py``).
"""

from __future__ import annotations

import ast
import json
import pickle
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as lpl
import lsgd_lightning.pytorch_lightning as twins
import pytest
import pytorch_lightning as pl

import lsgd_lightning
from tests.conftest import clean_launch_env

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ROOT / "src" / "lsgd_lightning" / "strategies"


def registered_names() -> list[str]:
    names = []
    for cls in lsgd_lightning.STRATEGIES:
        names += [cls.strategy_name, f"{cls.strategy_name}_spawn"]
    return names


@pytest.mark.parametrize("name", registered_names())
def test_every_name_is_registered_in_both_namespaces_with_that_namespaces_class(name: str) -> None:
    ours = lpl.strategies.StrategyRegistry.get(name)
    theirs = pl.strategies.StrategyRegistry.get(name)
    assert isinstance(ours, lpl.strategies.DDPStrategy) and not isinstance(ours, pl.strategies.Strategy)
    assert isinstance(theirs, pl.strategies.DDPStrategy) and not isinstance(theirs, lpl.strategies.Strategy)
    assert type(ours).__name__ == type(theirs).__name__
    assert type(theirs).__module__.startswith("lsgd_lightning.pytorch_lightning.")
    assert getattr(theirs, "tau", None) == getattr(ours, "tau", None)


def test_twin_classes_are_exported_and_pickle() -> None:
    for cls in lsgd_lightning.STRATEGIES:
        twin = getattr(twins, cls.__name__)
        assert issubclass(twin, pl.strategies.DDPStrategy)
        assert not any(base.__module__.startswith("lightning.") for base in twin.__mro__)
    strategy = twins.LSGDStrategy(tau=3)
    restored = pickle.loads(pickle.dumps(strategy))  # the spawn launcher pickles the strategy
    assert type(restored) is twins.LSGDStrategy and restored.tau == 3
    assert type(twins.LSGDStrategy(group_size=2)) is twins.MultiLeaderLSGDStrategy


def test_the_lightning_free_layer_is_shared_and_the_strategies_are_not() -> None:
    assert twins.LSGDStrategy is not lsgd_lightning.LSGDStrategy
    assert sys.modules["lsgd_lightning.pytorch_lightning.lsgd"].__file__ == lsgd_lightning.strategies.lsgd.__file__


def test_a_strategy_of_the_other_namespace_is_refused_with_a_pointer_to_its_twin() -> None:
    with pytest.raises(ValueError, match=r"lsgd_lightning\.pytorch_lightning\.LSGDStrategy"):
        pl.Trainer(accelerator="cpu", devices=1, strategy=lsgd_lightning.LSGDStrategy(), logger=False)
    with pytest.raises(ValueError, match=r"for lightning\.pytorch\.Trainer use lsgd_lightning\.EASGDStrategy"):
        lpl.Trainer(accelerator="cpu", devices=1, strategy=twins.EASGDStrategy(), logger=False)


def test_strategy_modules_import_lightning_only_through_the_two_mirrored_namespaces() -> None:
    """The twins are the modules' source with lightning.pytorch and lightning.fabric renamed: nothing else may be
    imported from ``lightning`` (it could not be mirrored)."""
    for path in sorted(STRATEGIES.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                if name == "lightning" or name.startswith("lightning."):
                    assert name.startswith(("lightning.pytorch", "lightning.fabric")), f"{path.name}: {name}"


@pytest.mark.parametrize("order", ["package_first", "pytorch_lightning_first"])
def test_names_are_registered_whichever_is_imported_first(order: str) -> None:
    imports = ["import lsgd_lightning", "import pytorch_lightning"]
    if order == "pytorch_lightning_first":
        imports.reverse()
    check = ["from pytorch_lightning.strategies import StrategyRegistry", "print('lsgd_async' in StrategyRegistry)"]
    code = "; ".join([*imports, *check])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "True", out.stderr[-2000:]


def test_hydra_builds_a_pytorch_lightning_trainer_with_a_strategy_name() -> None:
    from hydra.utils import instantiate

    config = {"_target_": "pytorch_lightning.Trainer", "accelerator": "cpu", "devices": 2, "strategy": "lsgd"}
    trainer = instantiate({**config, "logger": False})
    assert type(trainer.strategy) is twins.LSGDStrategy


def run_job(tmp_path: Path, *args: str) -> list[dict]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "pl_job.py"), *args],
        cwd=tmp_path,
        env=clean_launch_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    reports = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("result-*.json"))]
    assert sorted(r["rank"] for r in reports) == [0, 1], output[-4000:]
    return reports


@pytest.mark.parametrize(
    "args",
    [("name",), ("instance",), ("cli", "--trainer.strategy", "lsgd")],
    ids=["by-name", "by-instance", "lightning-cli"],
)
def test_pytorch_lightning_trains_with_the_strategy(tmp_path: Path, args: tuple[str, ...]) -> None:
    for report in run_job(tmp_path, *args):
        assert report["class"].startswith("lsgd_lightning.pytorch_lightning.")
        assert report["pl_base"] and not report["lightning_base"]
        assert report["steps"] == 16 and report["rounds"] >= 1
