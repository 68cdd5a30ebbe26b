"""Federated strategies: a small interface (:mod:`.base`) and one module per rule."""

from fl_components.config import StrategyConfig
from fl_components.errors import ConfigError
from fl_components.strategies.base import (
    AccountantStep,
    AggregatedUpdate,
    ServerState,
    SiteInstructions,
    Strategy,
)
from fl_components.strategies.fedavg import FedAvg, weighted_average

__all__ = [
    "AccountantStep",
    "AggregatedUpdate",
    "FedAvg",
    "ServerState",
    "SiteInstructions",
    "Strategy",
    "build_strategy",
    "weighted_average",
]


def build_strategy(config: StrategyConfig) -> Strategy:
    """The strategy named in the config."""
    if config.name == "fedavg":
        return FedAvg(server_lr=config.server_lr)
    raise ConfigError(f"strategy.name must be 'fedavg' (got {config.name!r})")
