"""Benchmark networks of the LSGD and EASGD papers and the LightningModule that trains them."""

from .classifier import NETWORKS, ImageClassifier, build_network, check_sgd_settings
from .cnn7 import CNN7
from .resnet import CifarResNet, ImageNetResNet, resnet20, resnet50
from .vgg import VGG16

__all__ = [
    "CNN7",
    "NETWORKS",
    "VGG16",
    "CifarResNet",
    "ImageClassifier",
    "ImageNetResNet",
    "build_network",
    "check_sgd_settings",
    "resnet20",
    "resnet50",
]
