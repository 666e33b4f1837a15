"""lsgd-lightning: communication-efficient distributed training strategies for PyTorch Lightning.

``import lsgd_lightning`` registers the strategy names with Lightning, so ``Trainer(strategy="lsgd")`` works:

========================  ==================================================================
``"lsgd"``                Leader SGD (:class:`LSGDStrategy`)
``"lsgd_multi"``          multi-leader Leader SGD, a leader per node (:class:`MultiLeaderLSGDStrategy`)
``"easgd"``               synchronous Elastic Averaging SGD (:class:`EASGDStrategy`)
``"lsgd_async"``          asynchronous Leader SGD (:class:`AsyncLSGDStrategy`)
``"easgd_async"``         asynchronous EASGD, the center on a parameter holder (:class:`AsyncEASGDStrategy`)
``"downpour"``            DOWNPOUR, asynchronous parameter-server SGD (:class:`DownpourStrategy`)
``"dataparallel"``        data-parallel SGD with communication accounting (:class:`DataParallelStrategy`)
``"dpsgd"``               decentralized gossip SGD, D-PSGD (:class:`DPSGDStrategy`)
``"d2"``                  D², decentralized SGD for workers whose data differ (:class:`D2Strategy`)
``"adpsgd"``              asynchronous-style pairwise gossip, AD-PSGD (:class:`ADPSGDStrategy`)
``"signum"``              Signum / signSGD with 1-bit majority vote (:class:`SignumStrategy`)
``"katyusha_x"``          Katyusha X, variance-reduced data-parallel SGD (:class:`KatyushaXStrategy`)
``"diloco"``              DiLoCo, local steps and an outer Nesterov step every tau (:class:`DiLoCoStrategy`)
``"streaming_diloco"``    Streaming DiLoCo, fragments, overlap, 8/4-bit (:class:`StreamingDiLoCoStrategy`)
========================  ==================================================================

Each name also exists with a ``_spawn`` suffix for the spawn launcher (notebooks, ``python -c`` with an importable
module). The names work in ``pytorch_lightning.Trainer`` too; its strategy classes are in
``lsgd_lightning.pytorch_lightning`` (the same classes, built on ``pytorch_lightning``'s base classes).
"""

from . import _twins, strategies
from .strategies import *  # noqa: F403  (the public classes; their one list is ``strategies.__all__``)

__version__ = "0.1.0.dev0"

__all__ = [*strategies.__all__, "__version__"]

_twins.install()  # pytorch_lightning's registry gets the same names once pytorch_lightning is imported
