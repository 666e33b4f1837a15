"""The strategies: one algorithm per module, on three bases (periodic, every-step, asynchronous) of one replica base.

``STRATEGIES`` is the one list of the package's strategy classes: importing this package registers each of them (and
its launcher variants) with Lightning.
"""

from lightning.pytorch.strategies import StrategyRegistry

from .adpsgd import ADPSGDStrategy
from .asynchronous import AsynchronousStrategy
from .base import ReplicaStrategy
from .d2 import D2Strategy
from .dataparallel import DataParallelStrategy
from .diloco import DiLoCoStrategy
from .downpour import DownpourStrategy
from .dpsgd import DPSGDStrategy
from .easgd import EASGDStrategy
from .easgd_async import AsyncEASGDStrategy
from .every_step import EveryStepStrategy
from .katyusha_x import KatyushaXStrategy
from .lsgd import LSGDStrategy
from .lsgd_async import AsyncLSGDStrategy
from .lsgd_multi import MultiLeaderLSGDStrategy
from .periodic import PeriodicStrategy
from .signum import SignumStrategy
from .streaming_diloco import StreamingDiLoCoStrategy
from .supervised import SupervisedStrategy

STRATEGIES = (
    LSGDStrategy,
    MultiLeaderLSGDStrategy,
    EASGDStrategy,
    DataParallelStrategy,
    DPSGDStrategy,
    D2Strategy,
    ADPSGDStrategy,
    SignumStrategy,
    AsyncLSGDStrategy,
    AsyncEASGDStrategy,
    DownpourStrategy,
    KatyushaXStrategy,
    DiLoCoStrategy,
    StreamingDiLoCoStrategy,
)

for _strategy in STRATEGIES:
    _strategy.register_strategies(StrategyRegistry)

__all__ = [
    "STRATEGIES",
    "ADPSGDStrategy",
    "AsyncEASGDStrategy",
    "AsyncLSGDStrategy",
    "AsynchronousStrategy",
    "D2Strategy",
    "DPSGDStrategy",
    "DataParallelStrategy",
    "DiLoCoStrategy",
    "DownpourStrategy",
    "EASGDStrategy",
    "EveryStepStrategy",
    "KatyushaXStrategy",
    "LSGDStrategy",
    "MultiLeaderLSGDStrategy",
    "PeriodicStrategy",
    "ReplicaStrategy",
    "SignumStrategy",
    "StreamingDiLoCoStrategy",
    "SupervisedStrategy",
]
