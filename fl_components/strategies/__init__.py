"""Federated strategies: a small interface (:mod:`.base`) and one module per rule."""

from fl_components.config import StrategyConfig
from fl_components.errors import ConfigError
from fl_components.round.types import (
    AggregatedUpdate,
    ServerState,
    SiteInstructions,
)
from fl_components.strategies.aggregation import AGGREGATORS, UpdateAggregation, bound_norm
from fl_components.strategies.base import Strategy
from fl_components.strategies.fedavg import FedAvg
from fl_components.strategies.fedavgm import FedAvgM
from fl_components.strategies.fedopt import FedAdagrad, FedAdam, FedYogi
from fl_components.strategies.fedprox import FedProx
from fl_components.strategies.qfedavg import QFedAvg
from fl_components.strategies.scaffold import Scaffold

__all__ = [
    "AGGREGATORS",
    "AggregatedUpdate",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "QFedAvg",
    "Scaffold",
    "ServerState",
    "SiteInstructions",
    "Strategy",
    "UpdateAggregation",
    "bound_norm",
    "build_strategy",
]

_ADAPTIVE = {"fedadagrad": FedAdagrad, "fedadam": FedAdam, "fedyogi": FedYogi}


def build_strategy(
    config: StrategyConfig, *, num_sites: int | None = None, local_lr: float | None = None
) -> Strategy:
    """The strategy named in the config.

    Parameters
    ----------
    config : StrategyConfig
        The ``strategy`` section.
    num_sites : int, optional
        N, the federation's sites (SCAFFOLD's c ← c + (|S|/N) Δc̄); required for scaffold.
    local_lr : float, optional
        The sites' learning rate η_l (q-FedAvg's L = 1/η_l); required for qfedavg.
    """
    aggregation = UpdateAggregation(
        rule=config.aggregator,
        trim_beta=config.trim_beta,
        byzantine_f=config.byzantine_f,
        multi_krum_m=config.multi_krum_m,
        norm_bound=config.norm_bound,
        robust_memory_mb=config.robust_memory_mb,
    )
    lr = config.effective_server_lr
    name = config.name
    if name == "fedavg":
        return FedAvg(server_lr=lr, aggregation=aggregation)
    if name == "fedavgm":
        return FedAvgM(
            server_lr=lr, server_momentum=config.server_momentum, aggregation=aggregation
        )
    if name == "fedprox":
        return FedProx(proximal_mu=config.proximal_mu, server_lr=lr, aggregation=aggregation)
    if name in _ADAPTIVE:
        return _ADAPTIVE[name](
            server_lr=lr,
            beta1=config.beta1,
            beta2=config.beta2,
            tau=config.tau,
            aggregation=aggregation,
        )
    if name == "scaffold":
        if num_sites is None:
            raise ConfigError(
                "strategy.name 'scaffold' needs num_sites (N, the federation's sites)"
            )
        return Scaffold(num_sites=num_sites, server_lr=lr, aggregation=aggregation)
    if name == "qfedavg":
        if local_lr is None:
            raise ConfigError("strategy.name 'qfedavg' needs local_lr (training.lr; L = 1/lr)")
        return QFedAvg(q=config.q, lipschitz=1.0 / local_lr)
    raise ConfigError(f"strategy.name {name!r} is not a known rule; see StrategyConfig.name")
