"""The strategies: one algorithm per module on the shared periodic-communication base."""

from lightning.pytorch.strategies import StrategyRegistry

from .adpsgd import ADPSGDStrategy
from .d2 import D2Strategy
from .dataparallel import DataParallelStrategy
from .downpour import DownpourStrategy
from .dpsgd import DPSGDStrategy
from .easgd import EASGDStrategy
from .easgd_async import AsyncEASGDStrategy
from .lsgd import LSGDStrategy, elect_leader
from .lsgd_async import AsyncLSGDStrategy
from .periodic import PeriodicCommunicationStrategy
from .signum import SignumStrategy

ALL_STRATEGIES = (
    LSGDStrategy,
    EASGDStrategy,
    DataParallelStrategy,
    DPSGDStrategy,
    D2Strategy,
    ADPSGDStrategy,
    SignumStrategy,
    AsyncLSGDStrategy,
    AsyncEASGDStrategy,
    DownpourStrategy,
)

for _strategy in ALL_STRATEGIES:
    _strategy.register_strategies(StrategyRegistry)

__all__ = [
    "ALL_STRATEGIES",
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
    "elect_leader",
]
