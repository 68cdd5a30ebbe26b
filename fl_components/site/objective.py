"""The site's local objective: what a strategy changes in local training.

FedProx's proximal term (Li et al. 2020, MLSys, arXiv:1812.06127, eq. 2) and SCAFFOLD's
gradient correction and client control variate (Karimireddy et al. 2020, ICML,
arXiv:1910.06378, Algorithm 1, lines 10 and 12, option II) run at the site; the server
rules that send their instructions live in :mod:`fl_components.strategies`. This module binds
them to one site's training run from the
:class:`~fl_components.round.types.SiteInstructions` the site was sent.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fl_components.errors import ConfigError, DataError, RoundError
from fl_components.parameters import NDArrays, subtract
from fl_components.round.types import SiteInstructions

CONTROL_FILE = "scaffold_control.npz"  # SCAFFOLD's c_i in the site's folder


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


def scaffold_correct_gradients(
    model: nn.Module,
    server_control: Sequence[torch.Tensor | np.ndarray],
    client_control: Sequence[torch.Tensor | np.ndarray],
) -> None:
    """G ← g − c_i + c for every parameter, in place (Algorithm 1, line 10).

    Call after ``loss.backward()`` and before ``optimizer.step()``. Pass tensors already on
    the model's device to avoid a copy per step.
    """
    params = list(model.parameters())
    if not len(params) == len(server_control) == len(client_control):
        raise RoundError(
            f"SCAFFOLD: {len(server_control)} server and {len(client_control)} site control "
            f"arrays for a model with {len(params)} parameters (the model has buffers, or the "
            "controls belong to another model)"
        )
    with torch.no_grad():
        for p, c, c_i in zip(params, server_control, client_control, strict=True):
            if p.grad is None:
                continue
            c_t = torch.as_tensor(c, dtype=p.grad.dtype, device=p.grad.device)
            c_i_t = torch.as_tensor(c_i, dtype=p.grad.dtype, device=p.grad.device)
            p.grad.add_(c_t - c_i_t)


def scaffold_client_control(
    client_control: NDArrays,
    server_control: NDArrays,
    global_params: NDArrays,
    local_params: NDArrays,
    *,
    steps: int,
    lr: float,
) -> NDArrays:
    """c_i⁺ = c_i − c + (x − y_i) / (K η_l) (Algorithm 1, line 12, option II)."""
    if steps < 1 or lr <= 0:
        raise RoundError(f"SCAFFOLD: needs steps >= 1 and lr > 0 (got steps={steps}, lr={lr})")
    scale = 1.0 / (steps * lr)
    return [
        (
            np.asarray(ci, np.float64)
            - np.asarray(c, np.float64)
            + (np.asarray(x, np.float64) - np.asarray(y, np.float64)) * scale
        ).astype(np.float32)
        for ci, c, x, y in zip(
            client_control, server_control, global_params, local_params, strict=True
        )
    ]


def load_client_control(folder: Path, like: NDArrays) -> NDArrays:
    """The site's c_i from ``folder/scaffold_control.npz``, or zeros before its first round."""
    path = Path(folder) / CONTROL_FILE
    if not path.is_file():
        return [np.zeros(a.shape, dtype=np.float32) for a in like]
    with np.load(path, allow_pickle=False) as archive:
        arrays = [archive[f"c{i}"] for i in range(len(archive.files))]
    shapes = [a.shape for a in arrays]
    if shapes != [a.shape for a in like]:
        raise DataError(
            f"{path}: control variate shapes {shapes} do not match the model's "
            f"{[a.shape for a in like]}; the model changed: delete {path} to start c_i at 0"
        )
    return [a.astype(np.float32) for a in arrays]


def save_client_control(folder: Path, control: NDArrays) -> Path:
    """Write c_i to ``folder/scaffold_control.npz`` atomically (``.npz``, no pickle)."""
    path = Path(folder) / CONTROL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{CONTROL_FILE}.partial.npz")
    np.savez(partial, **{f"c{i}": np.asarray(a, dtype=np.float32) for i, a in enumerate(control)})
    os.replace(partial, path)
    return path


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
    def penalty(self) -> Callable[[], torch.Tensor] | None:
        """FedProx's (μ/2)‖θ − θ_t‖² as a callable, or None."""
        if self.anchor is None:
            return None
        anchor, mu, model = self.anchor, self.mu, self.model
        return lambda: proximal_penalty(model, anchor, mu)

    @property
    def before_step(self) -> Callable[[], None] | None:
        """SCAFFOLD's g ← g − c_i + c as a callable, or None."""
        if self._c is None or self._c_i is None:
            return None
        c, c_i, model = self._c, self._c_i, self.model
        return lambda: scaffold_correct_gradients(model, c, c_i)

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
