"""The strategies: one algorithm per module on the shared periodic-communication base."""

from lightning.pytorch.strategies import StrategyRegistry

from .adpsgd import ADPSGDStrategy
from .d2 import D2Strategy
from .dataparallel import DataParallelStrategy
from .dpsgd import DPSGDStrategy
from .easgd import EASGDStrategy
from .lsgd import LSGDStrategy, elect_leader
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
)

for _strategy in ALL_STRATEGIES:
    _strategy.register_strategies(StrategyRegistry)

__all__ = [
    "ALL_STRATEGIES",
    "ADPSGDStrategy",
    "D2Strategy",
    "DPSGDStrategy",
    "DataParallelStrategy",
    "EASGDStrategy",
    "LSGDStrategy",
    "PeriodicCommunicationStrategy",
    "SignumStrategy",
    "elect_leader",
]
