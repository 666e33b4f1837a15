"""``lsgd-train``: the Hydra app that trains the papers' benchmarks with the LSGD, EASGD and data-parallel strategies.

Single runs (``lsgd-train ...``) train in this process; Lightning's launcher starts the other worker processes
(``popen`` re-runs this command line with the run directory pinned, ``spawn`` forks workers from here).

Sweeps (``lsgd-train -m ...``) run each combination as a child ``python -m lsgd_lightning.train`` process in RUN mode,
pinned to the job's directory of the sweep. Lightning's popen launcher re-runs ``sys.argv``, which in a multirun still
holds ``-m`` and the whole sweep, and pins every run to the same ``hydra.run.dir``; a child per run gives the launcher a
plain single-run command line, and gives every run fresh process state (process group, thread count, RNG, W&B run).

Torch, Lightning and the models/datamodules are imported inside the functions that use them, so that this module
adds nothing heavy to what ``import lsgd_lightning`` already costs (``--help``, ``--cfg``, the sweep parent).
"""

from __future__ import annotations

import csv
import inspect
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger(__name__)

#: Keys of the Hydra overrides that a sweep's child run must not inherit (the child is a plain run in the job's dir).
_PARENT_ONLY_HYDRA_KEYS = ("hydra.mode", "hydra.run", "hydra.sweep", "hydra.sweeper", "hydra.launcher", "hydra/sweeper")
_PARENT_ONLY_HYDRA_KEYS += ("hydra/launcher", "hydra.output_subdir")
#: Values of the W&B logger's ``mode`` setting.
_WANDB_MODES = ("offline", "online", "disabled")


class ConfigError(ValueError):
    """A setting has a value the app cannot use; the message names the setting and what is allowed."""


# --------------------------------------------------------------------------------------------------------------------
# Building the pieces from the config
# --------------------------------------------------------------------------------------------------------------------


def _plain(node: Any) -> Any:
    """OmegaConf node to plain Python containers, interpolations resolved; ``???`` values are a ConfigError."""
    if not OmegaConf.is_config(node):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise ConfigError(f"{err.full_key} must be set (it has no default), e.g. {err.full_key}=...") from err


def _absolute(path: str) -> str:
    """``path`` relative to the directory the app was started in (Hydra may have changed the working directory)."""
    if os.path.isabs(path):
        return path
    base = HydraConfig.get().runtime.cwd if HydraConfig.initialized() else None
    return os.path.join(base or os.getcwd(), path)


def call_with_settings(section: str, factory: Callable[..., Any], settings: Mapping[str, Any]) -> Any:
    """``factory(**settings)``; unknown keys and ``ValueError`` become a :class:`ConfigError` about ``section``."""
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(settings) - set(params))
        if unknown:
            allowed = ", ".join(name for name in params if name != "self")
            raise ConfigError(f"{section}: unknown setting(s) {', '.join(unknown)}; allowed: {allowed}")
    try:
        return factory(**settings)
    except ValueError as err:
        raise ConfigError(f"{section}: {err}") from err


def check_config(cfg: DictConfig) -> None:
    """Checks that need no data or model: integers, ranges and names, each error naming its setting."""
    from .models import NETWORKS, check_sgd_settings

    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise ConfigError(f"seed must be an integer, got {cfg.seed!r}")
    if not isinstance(cfg.workers, int) or isinstance(cfg.workers, bool) or cfg.workers < 1:
        raise ConfigError(f"workers must be a positive integer (worker processes per node), got {cfg.workers!r}")
    optim = _plain(cfg.optim)
    try:
        check_sgd_settings(**optim)
    except TypeError as err:
        raise ConfigError(f"optim: {err}; allowed: lr, momentum, nesterov, weight_decay, milestones, gamma") from err
    except ValueError as err:
        raise ConfigError(f"optim.{err}") from err
    if cfg.model.get("name") not in NETWORKS:
        raise ConfigError(f"model.name must be one of {', '.join(sorted(NETWORKS))}; got {cfg.model.get('name')!r}")
    uses_wandb = "_target_" in cfg.logger and str(cfg.logger._target_).endswith("WandbLogger")
    if uses_wandb and cfg.logger.get("mode", "offline") not in _WANDB_MODES:
        raise ConfigError(f"logger.mode must be one of {', '.join(_WANDB_MODES)}; got {cfg.logger.mode!r}")


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """The datamodule named by ``data.name``; relative paths are taken from the directory the app was started in."""
    from .data import DATAMODULES

    settings = dict(_plain(cfg.data))
    name = settings.pop("name", None)
    if name not in DATAMODULES:
        raise ConfigError(f"data.name must be one of {', '.join(DATAMODULES)}; got {name!r}")
    for key in ("data_dir", "root", "cache_dir"):
        if settings.get(key):
            settings[key] = _absolute(str(settings[key]))
    return call_with_settings(f"data ({name})", DATAMODULES[name], settings)


def build_model(cfg: DictConfig, datamodule: Any) -> pl.LightningModule:
    """An :class:`~lsgd_lightning.models.ImageClassifier` shaped by the datamodule (channels, image size, classes)."""
    from .models import ImageClassifier

    return call_with_settings(
        "model/optim",
        ImageClassifier,
        {
            "arch": cfg.model.name,
            "arch_kwargs": _plain(cfg.model.get("kwargs")) or {},
            "num_classes": datamodule.num_classes,
            "in_channels": datamodule.in_channels,
            "image_size": datamodule.image_size,
            **_plain(cfg.optim),
        },
    )


def build_strategy(cfg: DictConfig) -> Any:
    """Instantiate ``strategy`` (``_target_``); ``timeout_s`` becomes the ``timeout`` timedelta of DDPStrategy."""
    from hydra.errors import InstantiationException

    settings = dict(_plain(cfg.strategy))
    timeout_s = settings.pop("timeout_s", None)
    if timeout_s is not None:
        if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
            raise ConfigError(f"strategy.timeout_s must be a positive number of seconds, got {timeout_s!r}")
        settings["timeout"] = timedelta(seconds=timeout_s)
    import lsgd_lightning  # noqa: F401  (registers the strategy names with Lightning before instantiation)

    try:
        return hydra.utils.instantiate(settings)
    except InstantiationException as err:
        raise ConfigError(f"strategy: {err.__cause__ or err}") from err


def build_logger(cfg: DictConfig) -> Any:
    """The experiment logger of ``logger`` (``_target_``), or ``False`` for ``logger=none``."""
    if not cfg.logger or "_target_" not in cfg.logger:
        return False
    return hydra.utils.instantiate(cfg.logger)


def build_trainer(cfg: DictConfig, strategy: Any, logger: Any) -> pl.Trainer:
    """The Trainer from ``trainer`` plus the strategy, logger and the app's callbacks."""
    import lightning.pytorch as pl
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.callbacks import LearningRateMonitor

    callbacks: list[pl.Callback] = [LearningRateMonitor(logging_interval="epoch")] if logger else []
    settings = dict(_plain(cfg.trainer))
    try:
        return call_with_settings(
            "trainer", pl.Trainer, {**settings, "strategy": strategy, "logger": logger, "callbacks": callbacks}
        )
    except MisconfigurationException as err:
        raise ConfigError(f"trainer: {err}") from err


# --------------------------------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------------------------------


def _metric(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None else float(value)


def summary_line(results: Mapping[str, Any]) -> str:
    """The one line every run ends with: strategy, workers, test accuracy of the evaluated model, wall time, bytes."""
    acc = results.get("test_acc")
    comm = results.get("comm_bytes_per_step")
    return (
        f"lsgd-train summary: strategy={results['strategy']} workers={results['workers']} "
        f"test_acc={'n/a' if acc is None else f'{acc:.4f}'} (eval={results['eval_on']}) "
        f"wall_time={results['wall_time_s']:.1f}s "
        f"comm_bytes_per_step={'n/a' if comm is None else f'{comm:.4g}'}"
    )


def _quiet_known_warnings() -> None:
    """Silence two warnings that every run would print and that say nothing about the user's setup."""
    # Lightning 2.6 on torch >= 2.10 (fixed upstream in later Lightning releases).
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # Distributed testing is deliberate: the strategy evaluates one model (leader/centre) on every rank's shard.
    warnings.filterwarnings("ignore", message=r".*it is recommended to use `Trainer\(devices=1, num_nodes=1\)`")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train and test one configuration; rank 0 prints the summary line and writes the results file."""
    check_config(cfg)
    _quiet_known_warnings()
    import lightning.pytorch as pl

    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    # Downloads, decodes and checks happen here, before any worker starts: a missing or corrupt dataset fails once,
    # cleanly, instead of inside a distributed job where the other ranks would wait for the failed one.
    datamodule.prepare_data()
    model = build_model(cfg, datamodule)
    strategy = build_strategy(cfg)
    logger = build_logger(cfg)
    trainer = build_trainer(cfg, strategy, logger)
    for each in trainer.loggers:
        each.log_hyperparams(_plain(cfg))  # rank-zero-only: the resolved Hydra config, once

    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    fit_time = time.perf_counter() - start
    fit_metrics = dict(trainer.callback_metrics)  # test() replaces these
    test_metrics: dict[str, Any] = {}
    if cfg.test:
        test_metrics = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    wall_time = time.perf_counter() - start

    hydra_cfg = HydraConfig.get()
    results: dict[str, Any] = {
        "strategy": hydra_cfg.runtime.choices.get("strategy") or type(trainer.strategy).__name__,
        "strategy_class": type(trainer.strategy).__name__,
        "workers": trainer.world_size,
        "eval_on": getattr(trainer.strategy, "eval_on", None) or "local",
        "test_acc": _metric(test_metrics, "test/acc"),
        "test_loss": _metric(test_metrics, "test/loss"),
        "val_acc": _metric(fit_metrics, "val/acc"),
        "wall_time_s": wall_time,
        "fit_time_s": fit_time,
        "global_step": _metric(fit_metrics, "run/global_step"),
        "comm_bytes_per_step": _metric(fit_metrics, "run/comm_bytes_per_step"),
        **{name: _metric(fit_metrics, f"run/{name}") for name in ("comm_bytes", "comm_seconds", "comm_rounds")},
        "epochs": trainer.current_epoch,
        "seed": cfg.seed,
        "model": cfg.model.name,
        "data": cfg.data.name,
        "overrides": list(hydra_cfg.overrides.task),
        "run_dir": hydra_cfg.runtime.output_dir,
    }
    if trainer.is_global_zero:
        _finish_wandb()
        Path(hydra_cfg.runtime.output_dir, cfg.results_file).write_text(json.dumps(results, indent=2) + "\n")
        print(summary_line(results), flush=True)
    return results


def _finish_wandb() -> None:
    """Close the W&B run now (not at interpreter exit) so its files are complete when the run is reported done."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


# --------------------------------------------------------------------------------------------------------------------
# Sweeps: one child process per run
# --------------------------------------------------------------------------------------------------------------------


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def child_command(hydra_cfg: Any) -> list[str]:
    """Command line that runs the current sweep job as a plain run in the job's output directory."""
    command = [sys.executable, "-m", "lsgd_lightning.train", "--config-name", hydra_cfg.job.config_name]
    for source in hydra_cfg.runtime.config_sources:
        if source.provider == "command-line":  # --config-dir given to the sweep
            command += ["--config-dir", source.path]
        elif source.provider == "main" and source.schema == "file":
            command += ["--config-path", source.path]
    command += list(hydra_cfg.overrides.task)
    command += [o for o in hydra_cfg.overrides.hydra if not o.lstrip("~+").startswith(_PARENT_ONLY_HYDRA_KEYS)]
    command += [f"hydra.run.dir={_quote(hydra_cfg.runtime.output_dir)}", "hydra.output_subdir=null", "hydra.mode=RUN"]
    return command


def run_in_child(cfg: DictConfig) -> dict[str, Any] | None:
    """Run the current sweep job in a child process; return (and annotate) the results it wrote."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    command = child_command(hydra_cfg)
    log.info("sweep job %s: %s", hydra_cfg.job.num, " ".join(hydra_cfg.overrides.task))
    # From the directory the sweep was started in: relative paths (data.data_dir, ...) mean the same in every run.
    code = subprocess.run(command, cwd=hydra_cfg.runtime.cwd, check=False).returncode
    if code != 0:
        raise RuntimeError(
            f"sweep job {hydra_cfg.job.num} ({' '.join(hydra_cfg.overrides.task)}) failed with exit code {code}; "
            f"its output is above and in {run_dir}"
        )
    results_path = run_dir / cfg.results_file
    if not results_path.is_file():
        return None
    results = json.loads(results_path.read_text())
    results["job_num"] = hydra_cfg.job.num
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    return results


class SweepSummary(HydraCallback):
    """Hydra callback: after a multirun, write ``summary.csv`` into the sweep directory and print a table."""

    #: The first columns of summary.csv (every other results key follows, alphabetically).
    columns = ("job_num", "overrides", "strategy", "workers", "test_acc", "wall_time_s", "comm_bytes_per_step")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = []
        for path in sorted(sweep_dir.rglob(str(config.get("results_file", "results.json")))):
            try:
                rows.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        if not rows:
            return
        rows.sort(key=lambda row: row.get("job_num", 0))
        with open(sweep_dir / "summary.csv", "w", newline="") as handle:
            extra = sorted({key for row in rows for key in row} - set(self.columns))
            writer = csv.DictWriter(handle, fieldnames=[*self.columns, *extra])
            writer.writeheader()
            writer.writerows(rows)
        print(f"lsgd-train sweep: {len(rows)} run(s), results in {sweep_dir / 'summary.csv'}")
        for row in rows:
            acc, comm = row.get("test_acc"), row.get("comm_bytes_per_step")
            print(
                f"  #{row.get('job_num', '?')} {' '.join(row.get('overrides', []))}: test_acc="
                f"{'n/a' if acc is None else f'{acc:.4f}'} wall_time={row.get('wall_time_s', 0):.1f}s "
                f"comm_bytes_per_step={'n/a' if comm is None else f'{comm:.4g}'}"
            )


# --------------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------------


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict[str, Any] | None:
    """``lsgd-train``: one run, or with ``-m`` one child process per sweep job."""
    from .data import DataError

    if HydraConfig.get().mode == RunMode.MULTIRUN:
        return run_in_child(cfg)
    try:
        return train(cfg)
    except (ConfigError, DataError) as err:
        # A user mistake, not a bug: one clear line and exit code 2, no traceback.
        print(f"lsgd-train: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
