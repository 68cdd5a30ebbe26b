"""FedProx: FedAvg's server, local objectives with a proximal term.

Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith, "Federated Optimization in Heterogeneous
Networks", MLSys 2020, arXiv:1812.06127, Algorithm 2 and Eq. (2): site k minimizes

    h_k(θ; θ_t) = F_k(θ) + (μ/2) ‖θ − θ_t‖²

from θ_t; the server averages as FedAvg does. The coordinator sends μ in
:class:`SiteInstructions`; the site adds the gradient of :func:`proximal_penalty` to each
step's gradient (:func:`add_proximal_gradient`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fl_components.errors import RoundError
from fl_components.strategies.aggregation import UpdateAggregation
from fl_components.strategies.base import ServerState, SiteInstructions
from fl_components.strategies.fedavg import FedAvg


def proximal_penalty(
    model: nn.Module, global_tensors: Sequence[torch.Tensor], mu: float
) -> torch.Tensor:
    """(μ/2) Σ ‖θ − θ_t‖² over the model's parameters (Li et al. 2020, Eq. 2).

    Parameters
    ----------
    model : nn.Module
        The model being trained at the site.
    global_tensors : sequence of Tensor
        θ_t, one detached tensor per ``model.parameters()`` entry, on the model's device.
    mu : float
        μ ≥ 0.
    """
    params = list(model.parameters())
    if len(params) != len(global_tensors):
        raise RoundError(
            f"proximal term: {len(global_tensors)} global tensors for a model with "
            f"{len(params)} parameters; pass θ_t in model.parameters() order"
        )
    total = params[0].new_zeros(())
    for theta, anchor in zip(params, global_tensors, strict=True):
        total = total + torch.sum((theta - anchor.detach()) ** 2)
    return 0.5 * mu * total


def add_proximal_gradient(
    model: nn.Module, global_tensors: Sequence[torch.Tensor], mu: float
) -> None:
    """Add μ (θ − θ_t) to each gradient in place: that of :func:`proximal_penalty` (Eq. 2).

    Added to the gradient rather than to the loss so that DP-SGD can add it after the
    per-sample clipping and noise (it does not depend on any record).
    """
    params = list(model.parameters())
    if len(params) != len(global_tensors):
        raise RoundError(
            f"proximal term: {len(global_tensors)} global tensors for a model with "
            f"{len(params)} parameters; pass θ_t in model.parameters() order"
        )
    with torch.no_grad():
        for theta, anchor in zip(params, global_tensors, strict=True):
            if theta.grad is None:
                theta.grad = torch.zeros_like(theta)
            theta.grad.add_(theta.detach() - anchor.detach(), alpha=mu)


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
