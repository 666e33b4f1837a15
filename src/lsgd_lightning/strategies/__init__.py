"""The strategies: one algorithm per module on the shared periodic-communication base."""

from lightning.pytorch.strategies import StrategyRegistry

from .dataparallel import DataParallelStrategy
from .easgd import EASGDStrategy
from .lsgd import LSGDStrategy, elect_leader
from .periodic import PeriodicCommunicationStrategy

ALL_STRATEGIES = (LSGDStrategy, EASGDStrategy, DataParallelStrategy)

for _strategy in ALL_STRATEGIES:
    _strategy.register_strategies(StrategyRegistry)

__all__ = [
    "ALL_STRATEGIES",
    "DataParallelStrategy",
    "EASGDStrategy",
    "LSGDStrategy",
    "PeriodicCommunicationStrategy",
    "elect_leader",
]
