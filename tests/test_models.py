"""The benchmark networks (architecture and parameter counts) and the shared ImageClassifier LightningModule."""

from __future__ import annotations

import pickle
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lsgd_lightning.models import CNN7, NETWORKS, ImageClassifier, build_network, check_sgd_settings
from lsgd_lightning.models.cnn7 import cnn7_feature_size


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("name", "in_channels", "image_size", "num_classes", "expected"),
    [
        # conv 3->64 (4,864) + conv 64->128 (204,928) + conv 128->64 (73,792) + fc 256->256 + fc 256->10
        ("cnn7", 3, 28, 10, 351_946),
        ("cnn7", 1, 28, 10, 348_746),  # MNIST: only the first convolution shrinks
        ("cnn7", 3, 32, 10, 433_866),  # uncropped CIFAR: flatten 64*3*3 = 576
        ("vgg16", 3, 32, 10, 15_253_578),
        ("resnet20", 3, 32, 10, 269_722),  # the CIFAR ResNet paper's 0.27M
        ("resnet50", 3, 224, 1000, 25_557_032),  # ImageNet ResNet50's 25.6M
    ],
)
def test_parameter_counts(name: str, in_channels: int, image_size: int, num_classes: int, expected: int) -> None:
    net = build_network(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    assert n_params(net) == expected


def test_cnn7_layers_follow_the_paper() -> None:
    net = CNN7(num_classes=10, in_channels=3, image_size=28)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (3, 64, (5, 5)),
        (64, 128, (5, 5)),
        (128, 64, (3, 3)),
    ]
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(256, 256), (256, 10)]
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in net.modules())
    assert net.flatten_size == 256 and cnn7_feature_size(28) == 2 and cnn7_feature_size(32) == 3


@pytest.mark.parametrize(
    ("name", "in_channels", "image_size"),
    [("cnn7", 1, 28), ("cnn7", 3, 32), ("vgg16", 3, 28), ("vgg16", 3, 32), ("resnet20", 3, 28), ("resnet50", 1, 28)],
)
def test_forward_shapes(name: str, in_channels: int, image_size: int) -> None:
    net = build_network(name, num_classes=7, in_channels=in_channels, image_size=image_size).eval()
    with torch.no_grad():
        out = net(torch.randn(2, in_channels, image_size, image_size))
    assert out.shape == (2, 7)


@pytest.mark.parametrize(("name", "image_size"), [("cnn7", 20), ("vgg16", 8)])
def test_too_small_images_are_refused(name: str, image_size: int) -> None:
    with pytest.raises(ValueError, match=f"{name} needs images of at least .*image_size={image_size}"):
        build_network(name, num_classes=10, in_channels=3, image_size=image_size)


def test_unknown_network_lists_the_allowed_names() -> None:
    with pytest.raises(ValueError, match="unknown network 'lenet'; allowed: " + ", ".join(sorted(NETWORKS))):
        build_network("lenet", num_classes=10, in_channels=3, image_size=32)


def test_models_pickle_for_the_spawn_launcher() -> None:
    model = ImageClassifier("resnet20", num_classes=10, in_channels=3, image_size=32)
    clone = pickle.loads(pickle.dumps(model))
    x = torch.randn(2, 3, 32, 32)
    model.eval(), clone.eval()
    torch.testing.assert_close(model(x), clone(x))


def test_sgd_and_step_schedule_from_the_settings() -> None:
    model = ImageClassifier("cnn7", in_channels=1, image_size=28, lr=0.2, momentum=0.8, milestones=[3, 6], gamma=0.5)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.2, 0.8, True, 1e-4)
    assert isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR)
    assert dict(scheduler.milestones) == {3: 1, 6: 1} and scheduler.gamma == 0.5
    assert config["lr_scheduler"]["interval"] == "epoch"
    plain = ImageClassifier("cnn7", in_channels=1, image_size=28, nesterov=False, momentum=0.0, milestones=[])
    assert isinstance(plain.configure_optimizers(), torch.optim.SGD)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"lr": -0.1}, "lr must be > 0"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"momentum": 0.0, "nesterov": True}, "nesterov=true needs momentum > 0"),
        ({"weight_decay": -1e-4}, "weight_decay must be >= 0"),
        ({"gamma": 0.0}, r"gamma must be in \(0, 1\]"),
        ({"milestones": [5, 3]}, "milestones must be increasing positive epoch numbers"),
        ({"milestones": [0]}, "milestones must be increasing positive epoch numbers"),
    ],
)
def test_bad_sgd_settings_name_the_setting(settings: dict[str, Any], message: str) -> None:
    values: dict[str, Any] = {
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 1e-4,
        "milestones": [],
        "gamma": 0.1,
    }
    with pytest.raises(ValueError, match=message):
        check_sgd_settings(**{**values, **settings})
    with pytest.raises(ValueError, match=message):
        ImageClassifier("cnn7", **settings)


class RecordingClassifier(ImageClassifier):
    """Records every ``self.log`` call (module level, as Lightning models must be)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        self.calls.append((name, kwargs))
        super().log(name, value, *args, **kwargs)


def tiny_loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 28, 28, generator=generator)
    y = torch.randint(0, 10, (32,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def test_fit_and_test_log_accuracy_and_keep_training_metrics_rank_local(tmp_path: Any) -> None:
    model = RecordingClassifier(arch="cnn7", in_channels=1, image_size=28, milestones=[1])
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, train_dataloaders=tiny_loader(), val_dataloaders=tiny_loader())
    assert trainer.callback_metrics["run/global_step"] == trainer.global_step == 8
    assert 0.0 <= float(trainer.callback_metrics["val/acc"]) <= 1.0
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.005)  # dropped 10x after epoch 1
    (results,) = trainer.test(model, dataloaders=tiny_loader(), verbose=False)
    assert set(results) == {"test/acc", "test/loss"}
    train_calls = [kwargs for name, kwargs in model.calls if name.startswith("train/")]
    assert train_calls and all(not kwargs.get("sync_dist", False) for kwargs in train_calls)
    assert all(kwargs.get("on_epoch") is not True for kwargs in train_calls)  # per step, no epoch reduction
