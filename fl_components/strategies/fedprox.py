"""FedProx: FedAvg's server, local objectives with a proximal term.

Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith, "Federated Optimization in Heterogeneous
Networks", MLSys 2020, arXiv:1812.06127, Algorithm 2 and Eq. (2): site k minimizes

    h_k(θ; θ_t) = F_k(θ) + (μ/2) ‖θ − θ_t‖²

from θ_t; the server averages as FedAvg does. The coordinator sends μ in
:class:`SiteInstructions`; the site adds :func:`proximal_penalty` to each batch's loss.
"""

from __future__ import annotations

from collections.abc import Sequence

from fl_components.errors import RoundError
from fl_components.round.types import ServerState, SiteInstructions
from fl_components.strategies.aggregation import UpdateAggregation
from fl_components.strategies.fedavg import FedAvg


class FedProx(FedAvg):
    """FedAvg whose sites add (μ/2)‖θ − θ_t‖² to their loss."""

    name = "fedprox"

    def __init__(
        self,
        *,
        proximal_mu: float = 0.01,
        server_lr: float = 1.0,
        aggregation: UpdateAggregation | None = None,
    ) -> None:
        super().__init__(server_lr=server_lr, aggregation=aggregation)
        if proximal_mu < 0:
            raise RoundError(f"strategy.proximal_mu must be >= 0 (got {proximal_mu})")
        self.proximal_mu = proximal_mu

    def configure(
        self, round_num: int, state: ServerState, sites: Sequence[str]
    ) -> dict[str, SiteInstructions]:
        """Every site is sent μ."""
        return {site: SiteInstructions(proximal_mu=self.proximal_mu) for site in sites}

    def params(self) -> dict[str, str]:
        """FedAvg's params and μ."""
        return {**super().params(), "strategy.proximal_mu": repr(self.proximal_mu)}
