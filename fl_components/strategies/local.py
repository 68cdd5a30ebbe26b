"""What a strategy changes in a site's local training: FedProx's term, SCAFFOLD's correction.

The arithmetic lives with each rule (:mod:`.fedprox`, :mod:`.scaffold`); this binds it to
one site's training run from the :class:`~.base.SiteInstructions` the site was sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fl_components.errors import ConfigError
from fl_components.parameters import NDArrays, subtract
from fl_components.strategies.base import SiteInstructions
from fl_components.strategies.fedprox import add_proximal_gradient
from fl_components.strategies.scaffold import (
    load_client_control,
    save_client_control,
    scaffold_client_control,
    scaffold_correct_gradients,
)


@dataclass
class LocalObjective:
    """The hooks one local training run needs, and SCAFFOLD's c_i update at its end."""

    model: nn.Module
    global_parameters: NDArrays
    mu: float = 0.0
    anchor: list[torch.Tensor] | None = None
    server_control: NDArrays | None = None
    client_control: NDArrays | None = None
    folder: Path | None = None
    _c: list[torch.Tensor] | None = None
    _c_i: list[torch.Tensor] | None = None

    @classmethod
    def build(
        cls,
        model: nn.Module,
        global_parameters: NDArrays,
        instructions: SiteInstructions | None,
        *,
        folder: Path | None,
    ) -> LocalObjective:
        """The objective for ``instructions`` (None: plain local SGD); model on its device."""
        objective = cls(model=model, global_parameters=global_parameters)
        if instructions is None:
            return objective
        device = next(model.parameters()).device
        if instructions.proximal_mu > 0:
            objective.mu = instructions.proximal_mu
            objective.anchor = [p.detach().clone() for p in model.parameters()]
        if instructions.server_control is not None:
            if folder is None:
                raise ConfigError("SCAFFOLD needs the site's folder to keep its control variate")
            objective.folder = folder
            objective.server_control = instructions.server_control
            objective.client_control = load_client_control(folder, instructions.server_control)
            as_tensors = lambda arrays: [torch.as_tensor(a, device=device) for a in arrays]  # noqa: E731
            objective._c = as_tensors(instructions.server_control)
            objective._c_i = as_tensors(objective.client_control)
        return objective

    @property
    def adjust_gradients(self) -> Callable[[], None] | None:
        """The objective's terms on the gradient, as a callable; None for plain SGD.

        FedProx: g ← g + μ (θ − θ_t), the gradient of (μ/2)‖θ − θ_t‖²; SCAFFOLD:
        g ← g − c_i + c. Neither depends on the site's records, so under DP-SGD they are
        added to the privatized gradient (post-processing) and the objective is the same.
        """
        hooks: list[Callable[[], None]] = []
        if self.anchor is not None:
            anchor, mu, model = self.anchor, self.mu, self.model
            hooks.append(lambda: add_proximal_gradient(model, anchor, mu))
        if self._c is not None and self._c_i is not None:
            c, c_i, model = self._c, self._c_i, self.model
            hooks.append(lambda: scaffold_correct_gradients(model, c, c_i))
        if not hooks:
            return None

        def adjust() -> None:
            for hook in hooks:
                hook()

        return adjust

    def finish(self, local: NDArrays, *, steps: int, lr: float) -> NDArrays | None:
        """SCAFFOLD: c_i⁺ from option II, saved in the site's folder; return Δc_i."""
        if self.server_control is None or self.client_control is None or self.folder is None:
            return None
        updated = scaffold_client_control(
            self.client_control,
            self.server_control,
            self.global_parameters,
            local,
            steps=steps,
            lr=lr,
        )
        save_client_control(self.folder, updated)
        return subtract(updated, self.client_control)
