"""lsgd-lightning: communication-efficient distributed training strategies for PyTorch Lightning.

``import lsgd_lightning`` registers the strategy names with Lightning, so ``Trainer(strategy="lsgd")`` works:

========================  ==================================================================
``"lsgd"``                Leader SGD (:class:`LSGDStrategy`)
``"easgd"``               synchronous Elastic Averaging SGD (:class:`EASGDStrategy`)
``"dataparallel"``        data-parallel SGD with communication accounting (:class:`DataParallelStrategy`)
========================  ==================================================================

Each name also exists with a ``_spawn`` suffix for the spawn launcher (notebooks, ``python -c``).
"""

from .strategies import (
    DataParallelStrategy,
    EASGDStrategy,
    LSGDStrategy,
    PeriodicCommunicationStrategy,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "DataParallelStrategy",
    "EASGDStrategy",
    "LSGDStrategy",
    "PeriodicCommunicationStrategy",
    "__version__",
]
