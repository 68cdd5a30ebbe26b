"""Model parameters as numpy arrays: what moves between coordinator and sites.

Parameters travel as a list of float32 arrays in the model's ``state_dict`` order, or as
one flat float32 vector (what secure aggregation masks). Tensors never leave a process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fl_components.errors import FedpipeError

NDArrays = list[npt.NDArray[np.float32]]


class HasStateDict(Protocol):
    """A torch module, or a logged model's weights (``tracking.LoggedWeights``)."""

    def state_dict(self) -> Mapping[str, torch.Tensor]:
        """The parameters by name, in the module's order."""
        ...


def get_parameters(model: HasStateDict) -> NDArrays:
    """Copy a model's parameters out as float32 numpy arrays (state_dict order)."""
    return [
        t.detach().cpu().numpy().astype(np.float32, copy=True) for t in model.state_dict().values()
    ]


def set_parameters(model: nn.Module, parameters: NDArrays) -> None:
    """Load numpy arrays into a model, checking count and shapes."""
    state = model.state_dict()
    if len(parameters) != len(state):
        raise FedpipeError(
            f"got {len(parameters)} parameter arrays for a model with {len(state)}; "
            "the global model and the site's model differ (check model settings)"
        )
    new_state = {}
    for (key, current), array in zip(state.items(), parameters, strict=True):
        if tuple(current.shape) != tuple(array.shape):
            raise FedpipeError(
                f"parameter {key}: shape {tuple(array.shape)} does not match the model's "
                f"{tuple(current.shape)}"
            )
        new_state[key] = torch.as_tensor(array, dtype=current.dtype)
    model.load_state_dict(new_state)


def flatten(parameters: NDArrays) -> npt.NDArray[np.float32]:
    """Concatenate arrays into one flat float32 vector."""
    if not parameters:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([p.ravel() for p in parameters]).astype(np.float32, copy=False)


def unflatten(vector: npt.NDArray[np.floating], like: NDArrays) -> NDArrays:
    """Cut a flat vector back into arrays shaped like ``like``."""
    sizes = [p.size for p in like]
    if vector.size != sum(sizes):
        raise FedpipeError(f"flat vector has {vector.size} values, the model needs {sum(sizes)}")
    pieces = np.split(vector.astype(np.float32, copy=False), np.cumsum(sizes)[:-1])
    return [piece.reshape(p.shape) for piece, p in zip(pieces, like, strict=True)]


def add(parameters: NDArrays, delta: NDArrays, *, scale: float = 1.0) -> NDArrays:
    """Return ``parameters + scale * delta`` array by array."""
    return [
        (p + scale * d).astype(np.float32, copy=False)
        for p, d in zip(parameters, delta, strict=True)
    ]


def subtract(a: NDArrays, b: NDArrays) -> NDArrays:
    """Return ``a - b`` array by array."""
    return [(x - y).astype(np.float32) for x, y in zip(a, b, strict=True)]


def nbytes(parameters: NDArrays) -> int:
    """Bytes the arrays take on the wire as float32."""
    return int(sum(p.size for p in parameters) * 4)


def digest(parameters: NDArrays) -> str:
    """SHA-256 of the parameters' bytes: a model reference a participant can verify."""
    hasher = hashlib.sha256()
    for p in parameters:
        hasher.update(str(p.shape).encode())
        hasher.update(np.ascontiguousarray(p, dtype=np.float32).tobytes())
    return hasher.hexdigest()
