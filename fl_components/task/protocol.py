"""The task interface: the one place a user's model, data, loss and metrics enter fedpipe.

A task is any object with two methods, ``build_model(seed)`` and ``load_data(site)``; it
may also give ``loss``, ``metrics``, ``train_step``, ``evaluate`` and ``input_example``,
and :class:`BoundTask` supplies the defaults (cross-entropy, accuracy, one forward pass per
batch, a batched evaluation) for those it leaves out. fedpipe's own models are tasks of the
same interface (:mod:`fl_components.task.builtin`).

fedpipe owns the loop around the step: it zeroes the gradients, calls ``train_step`` for
the loss, back-propagates, lets the strategy adjust the gradient (FedProx's proximal term,
SCAFFOLD's correction) and steps the optimizer; under record-level DP, Opacus wraps the
model, the optimizer, the loader and the loss the step receives. A step therefore returns
the mean loss of its batch and never calls ``backward`` or ``step`` itself.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fl_components.errors import ConfigError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
EVAL_BATCH = 256


@dataclass(frozen=True)
class SiteContext:
    """Where a task runs: the site's name and its own data folder (nothing else)."""

    name: str
    folder: Path


@dataclass(frozen=True)
class TaskData:
    """A site's datasets: each item an ``(inputs, target)`` pair of any tensor shapes.

    ``test`` is the site's held-out split (evaluation); it may be empty.
    """

    train: Dataset[Any]
    test: Dataset[Any]


@runtime_checkable
class UserTask(Protocol):
    """What a task must give; everything else is optional (see :class:`BoundTask`)."""

    def build_model(self, seed: int) -> nn.Module:
        """A fresh model; fedpipe seeds torch's generator with ``seed`` around the call."""
        ...

    def load_data(self, site: SiteContext) -> TaskData:
        """The site's train and test datasets, read from ``site.folder`` only."""
        ...


def _size(dataset: Dataset[Any]) -> int:
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(
            f"task: a dataset of type {type(dataset).__name__} has no len(); fedpipe weights "
            "updates by example counts and plans DP-SGD from them: give it __len__"
        ) from None


def batch_size_of(batch: Any) -> int:
    """The number of records in a batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        return batch_size_of(next(iter(batch.values())))
    if isinstance(batch, list | tuple) and batch:
        return batch_size_of(batch[0])
    return 0


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (a tensor, or tuples, lists and dicts of them) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Top-1 accuracy of class scores ``outputs`` (batch, classes) against class indices."""
    return {"accuracy": float((outputs.argmax(dim=1) == targets).float().mean())}


_INIT_LOCK = threading.Lock()  # torch's global generator, while a model is built


def seeded(build: Callable[[], Any], seed: int) -> Any:
    """Call ``build`` with torch's generator seeded by ``seed``, never moving others' draws.

    torch's layers draw their initial weights from the process-wide generator, so it is
    seeded and its state restored under one lock: sites training on threads never see
    (or move) each other's draws.
    """
    with _INIT_LOCK:
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            return build()
        finally:
            torch.random.set_rng_state(state)


class BoundTask:
    """A task object with fedpipe's defaults for what it leaves out; what the site calls.

    Parameters
    ----------
    task : object
        A :class:`UserTask`, with any of ``loss(outputs, targets)``, ``metrics(outputs,
        targets) -> dict``, ``train_step(model, batch, loss_fn) -> loss``,
        ``evaluate(model, dataset, device) -> dict`` and ``input_example() -> ndarray``.
    spec : str
        Where it came from (``module:attribute``, or ``builtin:<kind>``), for messages.
    """

    def __init__(self, task: Any, *, spec: str) -> None:
        missing = [
            name for name in ("build_model", "load_data") if not callable(getattr(task, name, None))
        ]
        if missing:
            raise ConfigError(
                f"task {spec!r}: {type(task).__name__} has no {' or '.join(missing)}; a task "
                "needs build_model(seed) -> nn.Module and load_data(site) -> TaskData "
                "(see docs/how-to/bring-your-own-model.md)"
            )
        self.task = task
        self.spec = spec

    @property
    def custom_step(self) -> bool:
        """True when the task brings its own train step."""
        return callable(getattr(self.task, "train_step", None))

    def build_model(self, seed: int) -> nn.Module:
        """The task's model with weights drawn from ``seed`` (see :func:`seeded`)."""
        model = seeded(lambda: self.task.build_model(seed), seed)
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"task {self.spec!r}: build_model returned {type(model).__name__}, not a "
                "torch.nn.Module"
            )
        return model

    def load_data(self, site: SiteContext) -> TaskData:
        """The site's datasets, checked to be sized."""
        data = self.task.load_data(site)
        if not isinstance(data, TaskData):
            train, test = data  # a (train, test) pair is accepted too
            data = TaskData(train=train, test=test)
        _size(data.train)
        _size(data.test)
        return data

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The task's loss (mean over the batch); cross-entropy by default."""
        own = getattr(self.task, "loss", None)
        if callable(own):
            result: torch.Tensor = own(outputs, targets)
            return result
        return nn.functional.cross_entropy(outputs, targets)

    def loss_module(self) -> nn.Module | None:
        """The loss as a module with ``reduction`` (Opacus's ghost clipping), if it is one."""
        own = getattr(self.task, "loss", None)
        if own is None or not callable(own):
            return nn.CrossEntropyLoss()
        return own if isinstance(own, nn.Module) and hasattr(own, "reduction") else None

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """The task's metrics of one batch (means); top-1 accuracy by default."""
        own = getattr(self.task, "metrics", None)
        if callable(own):
            return {str(k): float(v) for k, v in own(outputs, targets).items()}
        return accuracy(outputs, targets)

    def train_step(self, model: nn.Module, batch: Any, loss_fn: LossFn) -> torch.Tensor:
        """The loss of one batch (not yet back-propagated).

        ``loss_fn`` is the task's loss, or the one Opacus wrapped (ghost clipping): a custom
        step must use it for the data loss.
        """
        own = getattr(self.task, "train_step", None)
        if callable(own):
            result: torch.Tensor = own(model, batch, loss_fn)
            return result
        inputs, targets = batch
        return loss_fn(model(inputs), targets)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, dataset: Dataset[Any], device: torch.device
    ) -> dict[str, float]:
        """``loss`` and the metrics on ``dataset``, each averaged over its records."""
        own = getattr(self.task, "evaluate", None)
        if callable(own):
            return {str(k): float(v) for k, v in own(model, dataset, device).items()}
        model.eval()
        totals: dict[str, float] = {}
        count = 0
        for batch in DataLoader(dataset, batch_size=EVAL_BATCH):
            inputs, targets = to_device(batch, device)
            outputs = model(inputs)
            size = batch_size_of(targets)
            values = {"loss": float(self.loss(outputs, targets)), **self.metrics(outputs, targets)}
            for key, value in values.items():
                totals[key] = totals.get(key, 0.0) + value * size
            count += size
        return {key: value / count for key, value in totals.items()} if count else {}

    def input_example(self) -> npt.NDArray[np.float32] | None:
        """A small input for the logged model's signature, when the task gives one."""
        own = getattr(self.task, "input_example", None)
        if callable(own):
            return np.asarray(own(), dtype=np.float32)
        return None


def metric_or_nan(values: Mapping[str, float], key: str) -> float:
    """``values[key]``, NaN when the task does not report it."""
    value = values.get(key)
    return float(value) if value is not None else math.nan


class _Classification:
    """The steps of a task without its model or data: for callers holding plain splits."""

    def build_model(self, seed: int) -> nn.Module:
        raise ConfigError("the default classification steps build no model; pass a task")

    def load_data(self, site: SiteContext) -> TaskData:
        raise ConfigError("the default classification steps load no data; pass a task")


# cross-entropy, accuracy, one forward pass per batch: what a task gets by default
CLASSIFICATION = BoundTask(_Classification(), spec="classification")
