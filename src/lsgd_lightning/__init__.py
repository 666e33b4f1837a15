"""lsgd-lightning: communication-efficient distributed training strategies for PyTorch Lightning.

``import lsgd_lightning`` registers the strategy names with Lightning, so ``Trainer(strategy="lsgd")`` works:

========================  ==================================================================
``"lsgd"``                Leader SGD (:class:`LSGDStrategy`)
``"easgd"``               synchronous Elastic Averaging SGD (:class:`EASGDStrategy`)
``"lsgd_async"``          asynchronous Leader SGD on a leader board (:class:`AsyncLSGDStrategy`)
``"easgd_async"``         asynchronous EASGD, the center on a parameter holder (:class:`AsyncEASGDStrategy`)
``"downpour"``            DOWNPOUR, asynchronous parameter-server SGD (:class:`DownpourStrategy`)
``"dataparallel"``        data-parallel SGD with communication accounting (:class:`DataParallelStrategy`)
``"dpsgd"``               decentralized gossip SGD, D-PSGD (:class:`DPSGDStrategy`)
``"d2"``                  D², decentralized SGD for workers whose data differ (:class:`D2Strategy`)
``"adpsgd"``              asynchronous-style pairwise gossip, AD-PSGD (:class:`ADPSGDStrategy`)
``"signum"``              Signum / signSGD with 1-bit majority vote (:class:`SignumStrategy`)
========================  ==================================================================

Each name also exists with a ``_spawn`` suffix for the spawn launcher (notebooks, ``python -c``).
"""

from .strategies import (
    ADPSGDStrategy,
    AsyncEASGDStrategy,
    AsyncLSGDStrategy,
    D2Strategy,
    DataParallelStrategy,
    DownpourStrategy,
    DPSGDStrategy,
    EASGDStrategy,
    LSGDStrategy,
    PeriodicCommunicationStrategy,
    SignumStrategy,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "ADPSGDStrategy",
    "AsyncEASGDStrategy",
    "AsyncLSGDStrategy",
    "D2Strategy",
    "DPSGDStrategy",
    "DataParallelStrategy",
    "DownpourStrategy",
    "EASGDStrategy",
    "LSGDStrategy",
    "PeriodicCommunicationStrategy",
    "SignumStrategy",
    "__version__",
]
