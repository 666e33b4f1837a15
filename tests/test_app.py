"""The ``lsgd-train`` Hydra app: config composition for every group, building the pieces, clear errors, and the
command line itself (a sweep of multi-process runs, W&B offline, a non-editable install) in clean subprocesses."""

from __future__ import annotations

import importlib.resources
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import MissingConfigException
from omegaconf import DictConfig, OmegaConf

import lsgd_lightning
from lsgd_lightning.train import (
    ConfigError,
    SweepSummary,
    build_datamodule,
    build_logger,
    build_model,
    build_strategy,
    build_trainer,
    check_config,
    child_command,
    summary_line,
)
from tests.app_helpers import (
    SMOKE,
    app_env,
    describe,
    read_results,
    read_wandb_run,
    run_app,
    summary_lines,
)

REPO = Path(__file__).resolve().parents[1]
#: The config groups and options the app must offer (issue 5).
GROUPS = {
    "strategy": {
        *("lsgd", "lsgd_multi", "easgd", "dataparallel", "dpsgd", "d2", "adpsgd", "signum"),
        *("lsgd_async", "easgd_async", "downpour", "katyusha_x", "diloco", "streaming_diloco"),
    },
    "model": {"cnn7", "vgg16", "resnet20", "resnet50"},
    "data": {"mnist5k", "cifar10", "imagefolder"},
    "logger": {"csv", "wandb", "none"},
    "trainer": {"cpu", "gpu"},
    "experiment": {"smoke", "cifar10_cnn7", "cifar10_resnet20", "cifar10_vgg16", "imagenet_resnet50"},
}
STRATEGY_CLASSES = {
    "lsgd": lsgd_lightning.LSGDStrategy,
    "lsgd_multi": lsgd_lightning.MultiLeaderLSGDStrategy,
    "easgd": lsgd_lightning.EASGDStrategy,
    "dataparallel": lsgd_lightning.DataParallelStrategy,
    "dpsgd": lsgd_lightning.DPSGDStrategy,
    "d2": lsgd_lightning.D2Strategy,
    "adpsgd": lsgd_lightning.ADPSGDStrategy,
    "signum": lsgd_lightning.SignumStrategy,
    "lsgd_async": lsgd_lightning.AsyncLSGDStrategy,
    "easgd_async": lsgd_lightning.AsyncEASGDStrategy,
    "downpour": lsgd_lightning.DownpourStrategy,
    "katyusha_x": lsgd_lightning.KatyushaXStrategy,
    "diloco": lsgd_lightning.DiLoCoStrategy,
    "streaming_diloco": lsgd_lightning.StreamingDiLoCoStrategy,
}


def load(*overrides: str) -> DictConfig:
    with initialize_config_module("lsgd_lightning.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One decoded-data cache for every app run of the session (mnist5k is parsed once)."""
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture
def offline_overrides(tmp_path: Path, cache_dir: Path) -> list[str]:
    """Overrides that make a composed config buildable outside a Hydra run (no run directory to interpolate)."""
    return ["logger=none", f"trainer.default_root_dir={tmp_path}", f"data.cache_dir={cache_dir}"]


# --------------------------------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------------------------------


def test_config_groups_ship_inside_the_package() -> None:
    conf = importlib.resources.files("lsgd_lightning.conf")
    found = {
        group: {p.name.removesuffix(".yaml") for p in conf.joinpath(group).iterdir() if p.name.endswith(".yaml")}
        for group in GROUPS
    }
    assert found == GROUPS
    assert (REPO / "conf").resolve() == (REPO / "src" / "lsgd_lightning" / "conf").resolve()


def test_default_config_is_the_main_job() -> None:
    cfg = load()
    assert cfg.strategy._target_ == "lsgd_lightning.LSGDStrategy"
    assert (cfg.workers, cfg.trainer.devices, cfg.trainer.accelerator) == (4, 4, "cpu")
    assert (cfg.data.name, cfg.model.name, cfg.logger._target_.rsplit(".", 1)[-1]) == ("mnist5k", "cnn7", "CSVLogger")
    assert cfg.trainer.enable_progress_bar is True and cfg.test is True
    check_config(cfg)


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in sorted(GROUPS[g])])
def test_every_group_option_composes(group: str, option: str) -> None:
    cfg = load(f"{group}={option}")
    check_config(cfg)
    node = cfg.get(group)
    if group == "strategy":
        assert node._target_ == f"lsgd_lightning.{STRATEGY_CLASSES[option].__name__}"
    elif group in ("model", "data"):
        assert node.name == option
    elif group == "logger":
        loggers = {"csv": "CSVLogger", "wandb": "WandbLogger", "none": None}
        assert (node.get("_target_") or "").rsplit(".", 1)[-1] == (loggers[option] or "")
    elif group == "trainer":
        assert node.accelerator == option and node.devices == cfg.workers
    else:  # experiment presets: the paper settings they stand for
        expected_model = {"smoke": "cnn7", "imagenet_resnet50": "resnet50"}.get(option, option.split("_")[-1])
        assert cfg.model.name == expected_model
        if option.startswith("cifar10"):
            assert (cfg.data.name, cfg.data.augment, cfg.data.crop_size, cfg.data.batch_size) == (
                "cifar10",
                "random_crop",
                28,
                128,
            )
            assert cfg.optim.nesterov and cfg.optim.weight_decay == 1e-4


def test_command_line_choices_beat_presets() -> None:
    cfg = load("experiment=cifar10_resnet20", "model=vgg16", "strategy=easgd", "workers=16")
    assert (cfg.model.name, cfg.workers, cfg.trainer.devices) == ("vgg16", 16, 16)
    assert cfg.strategy._target_ == "lsgd_lightning.EASGDStrategy"


def test_unknown_group_option_lists_the_choices() -> None:
    with pytest.raises(MissingConfigException, match=r"Could not find 'model/lenet'") as info:
        load("model=lenet")
    assert all(name in str(info.value) for name in GROUPS["model"])


# --------------------------------------------------------------------------------------------------------------------
# Building the pieces
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", sorted(GROUPS["strategy"]))
def test_strategy_configs_instantiate_with_a_timedelta_timeout(option: str) -> None:
    strategy = build_strategy(load(f"strategy={option}", "strategy.timeout_s=60", "strategy.start_method=spawn"))
    assert type(strategy) is STRATEGY_CLASSES[option]
    assert strategy._timeout == timedelta(seconds=60) and strategy._start_method == "spawn"
    if option == "lsgd_multi":
        assert (strategy.group_size, strategy.tau, strategy.local_tau) == ("node", 64, 16)
        assert strategy.pull_order == "sequential"  # Algorithm 1's order
    if option.startswith("lsgd"):
        assert (strategy.eval_on, strategy.bn_recalibration_batches) == ("leader", 0)


@pytest.mark.parametrize("option", ["lsgd", "lsgd_multi", "lsgd_async"])
def test_lsgd_configs_evaluate_the_paper_s_average_on_request(option: str) -> None:
    cfg = load(f"strategy={option}", "strategy.eval_on=average", "strategy.bn_recalibration_batches=20")
    strategy = build_strategy(cfg)
    assert (strategy.eval_on, strategy.bn_recalibration_batches) == ("average", 20)


def test_lsgd_multi_config_refuses_overshooting_simultaneous_pulls() -> None:
    overrides = ["strategy.pull_order=simultaneous", "strategy.pull_strength=0.6", "strategy.local_pull_strength=0.6"]
    with pytest.raises(ConfigError, match=r"pull_order='simultaneous' needs local_pull_strength \+ pull_strength"):
        build_strategy(load("strategy=lsgd_multi", *overrides))


def test_lsgd_async_config_runs_the_multi_leader_algorithm1_on_request() -> None:
    assert build_strategy(load("strategy=lsgd_async")).group_size is None  # one leader by default
    strategy = build_strategy(load("strategy=lsgd_async", "strategy.group_size=2", "strategy.local_tau=4"))
    assert (strategy.group_size, strategy.local_tau, strategy.pull_order) == (2, 4, "sequential")


def test_diloco_outer_optimizer_from_hydra_partial() -> None:
    cfg = load("strategy=diloco", "strategy.outer_optimizer={_target_:torch.optim.Adam,_partial_:true,lr:0.001}")
    strategy = build_strategy(cfg)
    optimizer = strategy._outer_factory([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["lr"] == 0.001


@pytest.mark.parametrize("data", ["mnist5k", "cifar10"])
@pytest.mark.parametrize("model", sorted(GROUPS["model"]))
def test_models_are_shaped_by_the_datamodule(model: str, data: str, tmp_path: Path) -> None:
    cfg = load(f"model={model}", f"data={data}", f"data.data_dir={tmp_path}" if data == "cifar10" else "seed=0")
    datamodule = build_datamodule(cfg)
    module = build_model(cfg, datamodule)
    assert (module.hparams.in_channels, module.hparams.image_size) == ((1, 28) if data == "mnist5k" else (3, 28))
    assert module.hparams.arch == model and module.hparams.lr == cfg.optim.lr


def test_imagefolder_root_must_be_set() -> None:
    with pytest.raises(ConfigError, match=r"data.root must be set"):
        build_datamodule(load("data=imagefolder"))


def test_main_job_trainer_builds(offline_overrides: list[str]) -> None:
    cfg = load(*offline_overrides)
    trainer = build_trainer(cfg, build_strategy(cfg), build_logger(cfg))
    assert isinstance(trainer.strategy, lsgd_lightning.LSGDStrategy)
    assert trainer.max_epochs == cfg.trainer.max_epochs and trainer.num_devices == 4 and trainer.logger is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lr=-0.1"], r"optim.lr must be > 0, got -0.1"),
        (["optim.momentum=1.5"], r"optim.momentum must be in \[0, 1\)"),
        (["optim.milestones=[9,3]"], r"optim.milestones must be increasing"),
        (["workers=0"], r"workers must be a positive integer .*got 0"),
        (["seed=abc"], r"seed must be an integer, got 'abc'"),
        (["model.name=lenet"], r"model.name must be one of cnn7, resnet20, resnet50, vgg16; got 'lenet'"),
        (["data.name=svhn"], r"data.name must be one of mnist5k, cifar10, imagefolder; got 'svhn'"),
        (["data.augment=zoom"], r"data \(mnist5k\): augment must be one of none, pad_crop, random_crop; got 'zoom'"),
        (["data.batch_size=0"], r"data \(mnist5k\): batch_size must be a positive integer"),
        (["+data.colour=1"], r"data \(mnist5k\): unknown setting\(s\) colour; allowed: batch_size, "),
        (["model=vgg16", "data.augment=random_crop", "data.crop_size=12"], r"vgg16 needs images of at least 16x16"),
        (["strategy.tau=0"], r"strategy: tau must be an integer >= 1, got 0"),
        (["strategy.timeout_s=-5"], r"strategy.timeout_s must be a positive number of seconds, got -5"),
        (["+strategy.colour=1"], r"strategy: .*colour"),
        (["+trainer.colour=1"], r"trainer: unknown setting\(s\) colour"),
        (["logger=wandb", "logger.mode=cloud"], r"logger.mode must be one of offline, online, disabled; got 'cloud'"),
    ],
)
def test_bad_values_name_the_setting_and_allowed_values(
    overrides: list[str], message: str, offline_overrides: list[str]
) -> None:
    cfg = load(*offline_overrides[1:], *overrides)  # keep the logger group free for logger=wandb; never built here
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)
        datamodule = build_datamodule(cfg)
        build_model(cfg, datamodule)
        build_trainer(cfg, build_strategy(cfg), False)


# --------------------------------------------------------------------------------------------------------------------
# Sweep plumbing and reporting
# --------------------------------------------------------------------------------------------------------------------


def test_sweep_child_command_is_a_plain_run_in_the_job_directory() -> None:
    hydra_cfg = SimpleNamespace(
        job=SimpleNamespace(config_name="config"),
        runtime=SimpleNamespace(
            output_dir='/sweeps/my "odd" dir/3',
            config_sources=[
                SimpleNamespace(provider="hydra", schema="pkg", path="hydra.conf"),
                SimpleNamespace(provider="main", schema="pkg", path="lsgd_lightning.conf"),
                SimpleNamespace(provider="command-line", schema="file", path="/my/configs"),
            ],
        ),
        overrides=SimpleNamespace(
            task=["strategy=easgd", "seed=1", "optim.milestones=[3,6]"],
            hydra=["hydra.mode=MULTIRUN", "hydra.sweep.dir=/sweeps", "hydra.verbose=true", "hydra/sweeper=basic"],
        ),
    )
    command = child_command(hydra_cfg)
    assert command[:3] == [sys.executable, "-m", "lsgd_lightning.train"]
    assert command[3:] == [
        "--config-name",
        "config",
        "--config-dir",
        "/my/configs",
        "strategy=easgd",
        "seed=1",
        "optim.milestones=[3,6]",
        "hydra.verbose=true",
        'hydra.run.dir="/sweeps/my \\"odd\\" dir/3"',
        "hydra.output_subdir=null",
        "hydra.mode=RUN",
    ]


def test_summary_line_reads_well_with_and_without_numbers() -> None:
    results = {"strategy": "lsgd", "workers": 4, "eval_on": "leader", "wall_time_s": 81.25}
    assert summary_line({**results, "test_acc": 0.96789, "comm_bytes_per_step": 122062.5}) == (
        "lsgd-train summary: strategy=lsgd workers=4 test_acc=0.9679 (eval=leader) wall_time=81.2s "
        "comm_bytes_per_step=1.221e+05"
    )
    assert "test_acc=n/a" in summary_line(results) and "comm_bytes_per_step=n/a" in summary_line(results)


def test_sweep_summary_collects_every_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for num, strategy in enumerate(["lsgd", "easgd"]):
        (tmp_path / str(num)).mkdir()
        row = {"job_num": num, "overrides": [f"strategy={strategy}"], "strategy": strategy, "workers": 2}
        row.update(test_acc=0.5, wall_time_s=1.0, comm_bytes_per_step=None)
        (tmp_path / str(num) / "results.json").write_text(json.dumps(row))
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    lines = (tmp_path / "summary.csv").read_text().splitlines()
    assert len(lines) == 3 and "strategy" in lines[0]
    out = capsys.readouterr().out
    assert "2 run(s)" in out and "#1 strategy=easgd: test_acc=0.5000" in out


# --------------------------------------------------------------------------------------------------------------------
# The command line (subprocesses with a clean launch environment)
# --------------------------------------------------------------------------------------------------------------------


def test_cli_bad_value_is_one_clear_line_and_exit_code_2(tmp_path: Path, cache_dir: Path) -> None:
    result = run_app(["optim.lr=-0.1", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, cache_dir=cache_dir, timeout=120)
    assert result.returncode == 2, describe(result)
    assert "lsgd-train: error: optim.lr must be > 0, got -0.1" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_sweep_runs_each_combination_as_its_own_multi_process_run(tmp_path: Path, cache_dir: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    result = run_app(
        # a 2 x 2 grid: both dimensions of the product, four multi-process runs (EASGD is trained in test_distributed)
        ["-m", *SMOKE, "strategy=lsgd,dataparallel", "seed=0,1", f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path,
        cache_dir=cache_dir,
        timeout=900,  # a hang guard (each run's collectives time out after 60 s); 400 s ran out at load 15
    )
    assert result.returncode == 0, describe(result)
    assert len(summary_lines(result.stdout)) == 4, describe(result)
    assert not (tmp_path / "outputs").exists()  # no run escaped into a default run directory
    seen = set()
    for job in range(4):
        run_dir = sweep_dir / str(job)
        results = read_results(run_dir)
        seen.add((results["strategy"], results["seed"]))
        assert results["workers"] == 2 and results["job_num"] == job and Path(results["run_dir"]) == run_dir
        assert results["test_acc"] is not None and results["global_step"] == 20
        assert (run_dir / "train_ddp_process_1.log").exists()  # the second worker ran in this job's directory
        metrics = (run_dir / "csv" / "metrics.csv").read_text()
        assert "val/acc" in metrics.splitlines()[0] and "test/acc" in metrics.splitlines()[0]
        if results["strategy"] == "lsgd":
            assert results["comm_rounds"] == 1 and "lsgd/leader" in metrics
        else:
            assert results["comm_bytes_per_step"] == pytest.approx(4 * 348_746, rel=0.01)
    assert seen == {(s, seed) for s in ("lsgd", "dataparallel") for seed in (0, 1)}
    assert len((sweep_dir / "summary.csv").read_text().splitlines()) == 5
    assert "lsgd-train sweep: 4 run(s)" in result.stdout


def test_cli_wandb_offline_run_holds_config_strategy_metrics_and_accuracy(tmp_path: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_app(
        [*SMOKE, "logger=wandb", "strategy.tau=4", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        cache_dir=cache_dir,
        timeout=300,
    )
    assert result.returncode == 0, describe(result)
    (line,) = summary_lines(result.stdout)
    assert "strategy=lsgd workers=2" in line and "comm_bytes_per_step=n/a" not in line
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    keys = read_wandb_run(run_file)
    assert {"lsgd/leader", "lsgd/leader_score", "lsgd/dist_to_leader", "comm/bytes", "comm/seconds"} <= keys["history"]
    assert {"train/loss", "val/acc", "test/acc", "trainer/global_step"} <= keys["history"]
    assert {"strategy", "model", "data", "optim", "trainer", "seed", "workers"} <= keys["config"]  # Hydra config
    assert "test/acc" in keys["summary"]
    for path in run_dir.rglob("*"):  # no credentials written anywhere in the run directory
        if path.is_file() and path.suffix in {".yaml", ".json", ".log", ".txt"}:
            assert "api_key" not in path.read_text(errors="replace").lower(), path


@pytest.fixture(scope="module")
def installed_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The package built as a wheel and installed (not editable) into a fresh target directory."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, source / name)
    target = work / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            target,
            source,
        ],
        check=True,
        timeout=180,
        capture_output=True,
    )
    yield target


def test_console_script_from_a_non_editable_install(installed_app: Path, tmp_path: Path, cache_dir: Path) -> None:
    script = installed_app / "bin" / "lsgd-train"
    env = app_env(cache_dir, PYTHONPATH=str(installed_app))
    assert not (installed_app / "lsgd_lightning" / "conf").is_symlink()
    assert sorted(p.name for p in (installed_app / "lsgd_lightning" / "conf" / "strategy").glob("*.yaml")) == sorted(
        f"{option}.yaml" for option in GROUPS["strategy"]
    )
    # The installed copy, not the checkout, is what Python finds (find_spec does not run the package).
    where = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('lsgd_lightning').origin)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(installed_app)

    run = [sys.executable, str(script)]
    help_ = run_app(["--help"], command=run, cwd=tmp_path, cache_dir=cache_dir, env=env, timeout=120)
    assert help_.returncode == 0, describe(help_)
    assert "strategy: " + ", ".join(sorted(GROUPS["strategy"])) in help_.stdout
    assert "lsgd-train -m strategy=" in help_.stdout
    job = run_app(
        ["--cfg", "job", "strategy=easgd"], command=run, cwd=tmp_path, cache_dir=cache_dir, env=env, timeout=120
    )
    assert job.returncode == 0, describe(job)
    assert "_target_: lsgd_lightning.EASGDStrategy" in job.stdout and "name: mnist5k" in job.stdout

    run_dir = tmp_path / "run"
    tiny = run_app(
        [*SMOKE, "logger=none", f"hydra.run.dir={run_dir}"],
        command=run,
        cwd=tmp_path,
        cache_dir=cache_dir,
        env=env,
        timeout=300,
    )
    assert tiny.returncode == 0, describe(tiny)
    assert len(summary_lines(tiny.stdout)) == 1 and read_results(run_dir)["workers"] == 2
    assert (run_dir / "train_ddp_process_1.log").exists()
