"""Local training and evaluation at a site, in torch (CUDA when present, CPU otherwise).

A participant starts from the global parameters θ_t, trains for a number of local epochs on
its own data, and returns the update Δ = θ_k − θ_t with its number of examples (FedAvg's
weight; McMahan et al. 2017, AISTATS, arXiv:1602.05629, Algorithm 1, ClientUpdate).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fl_components.config import TrainingConfig
from fl_components.data.types import Split
from fl_components.parameters import NDArrays, get_parameters, set_parameters, subtract
from fl_components.round.types import LocalUpdate, Metrics, SiteInstructions
from fl_components.site.objective import LocalObjective


def share_cores(config: TrainingConfig, *, sites: int) -> int:
    """Set torch's CPU threads for ``sites`` sites training side by side in one process.

    Each site's model is small, so a site gains little from several threads, while several
    sites each running a full team of OpenMP threads on the same cores spin against each
    other: measured on 2 cores, the bare 10-site digits loop took 65 s with torch's default
    and 14 s with one thread per site. ``config.threads`` overrides. Returns the count set.
    """
    threads = config.threads or max(1, (os.cpu_count() or 1) // max(1, sites))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def pick_device(preference: str = "auto") -> torch.device:
    """CUDA when asked for or when 'auto' and a GPU is present; CPU otherwise."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def make_optimizer(model: nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    """The local optimizer named in the config (fresh state every round)."""
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)


def make_loader(
    split: Split, *, batch_size: int, seed: int
) -> DataLoader[tuple[torch.Tensor, ...]]:
    """A shuffling loader over a split, its order fixed by ``seed``."""
    dataset = TensorDataset(torch.from_numpy(split.features), torch.from_numpy(split.labels))
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=min(batch_size, len(split)), shuffle=True, generator=generator
    )


@dataclass
class TrainingRun:
    """What one local training run steps: model, optimizer, batches, loss, objective terms.

    ``adjust_gradients`` adds the strategy's data-independent terms (FedProx's proximal
    gradient, SCAFFOLD's correction) to the gradient before each step; ``close`` undoes
    what a wrapper installed. A :class:`TrainingWrapper` (DP-SGD) returns another run
    around the same model and the same objective.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader[tuple[torch.Tensor, ...]]
    loss_fn: nn.Module | None = None
    adjust_gradients: Callable[[], None] | None = None
    close: Callable[[], None] | None = None


class TrainingWrapper(Protocol):
    """Wraps a plain training run (record-level DP: :class:`fl_components.site.dpsgd.DPSGD`).

    It must keep the run's objective: whatever it does to the gradients, the run's
    ``adjust_gradients`` still applies to the gradient the optimizer steps with.
    """

    def wrap(self, run: TrainingRun) -> TrainingRun:
        """The run to train instead of ``run``."""
        ...


def train_epochs(
    model: nn.Module,
    loader: DataLoader[tuple[torch.Tensor, ...]],
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    device: torch.device,
    loss_fn: nn.Module | None = None,
    adjust_gradients: Callable[[], None] | None = None,
) -> float:
    """Run ``epochs`` passes; return the mean training loss of the last epoch.

    ``loss_fn`` defaults to cross-entropy; DP-SGD passes the criterion Opacus wrapped
    (ghost clipping needs its own). ``adjust_gradients()`` runs between ``backward`` and
    the optimizer step (the strategy's objective terms: FedProx's proximal gradient,
    SCAFFOLD's correction). The reported loss is the data loss alone.
    """
    loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    model.train()
    last_loss = float("nan")
    for _ in range(epochs):
        total, count = 0.0, 0
        for features, labels in loader:
            if len(labels) == 0:  # Poisson sampling (DP) can draw an empty batch
                continue
            features, labels = features.to(device), labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(features), labels)
            loss.backward()
            if adjust_gradients is not None:
                adjust_gradients()
            optimizer.step()
            total += float(loss.detach()) * len(labels)
            count += len(labels)
        last_loss = total / max(count, 1)
    return last_loss


def local_train(
    model: nn.Module,
    global_parameters: NDArrays,
    train: Split,
    config: TrainingConfig,
    *,
    site: str,
    round_num: int,
    seed: int,
    instructions: SiteInstructions | None = None,
    folder: Path | None = None,
    wrapper: TrainingWrapper | None = None,
) -> LocalUpdate:
    """Train ``model`` from θ_t on ``train`` and return Δ = θ_k − θ_t.

    ``instructions`` come from the strategy (FedProx's μ, SCAFFOLD's c, q-FedAvg's request
    for F_k(θ_t)); ``folder`` is the site's own folder, where SCAFFOLD keeps the site's
    control variate c_i across rounds. ``wrapper`` (DP-SGD) wraps the run: the same
    objective, with its per-sample clipping and noise around the data gradient.
    """
    started = time.perf_counter()
    device = pick_device(config.device)
    # the seed reaches the data order through the loader's own generator, never torch's
    # process-wide one (sites train side by side on threads)
    set_parameters(model, global_parameters)
    model.to(device)
    loader = make_loader(train, batch_size=config.batch_size, seed=seed)
    objective = LocalObjective.build(model, global_parameters, instructions, folder=folder)
    initial_loss = (
        evaluate(model, global_parameters, train, device=config.device).loss
        if instructions is not None and instructions.report_initial_loss
        else None
    )
    model.to(device)
    run = TrainingRun(
        model=model,
        optimizer=make_optimizer(model, config),
        loader=loader,
        adjust_gradients=objective.adjust_gradients,
    )
    if wrapper is not None:
        run = wrapper.wrap(run)
    try:
        loss = train_epochs(
            run.model,
            run.loader,
            run.optimizer,
            epochs=config.epochs,
            device=device,
            loss_fn=run.loss_fn,
            adjust_gradients=run.adjust_gradients,
        )
    finally:
        if run.close is not None:
            run.close()
    model.to("cpu")
    local = get_parameters(model)
    control_delta = objective.finish(local, steps=config.epochs * len(run.loader), lr=config.lr)
    return LocalUpdate(
        site=site,
        round=round_num,
        delta=subtract(local, global_parameters),
        num_examples=len(train),
        train_loss=loss,
        seconds=time.perf_counter() - started,
        control_delta=control_delta,
        initial_loss=initial_loss,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, parameters: NDArrays, split: Split, *, device: str = "auto"
) -> Metrics:
    """Cross-entropy loss and accuracy of ``parameters`` on ``split``."""
    if len(split) == 0:
        return Metrics(loss=float("nan"), accuracy=float("nan"), examples=0)
    set_parameters(model, parameters)
    target = pick_device(device)
    model.to(target).eval()
    features = torch.from_numpy(split.features).to(target)
    labels = torch.from_numpy(split.labels).to(target)
    logits = model(features)
    loss = float(nn.functional.cross_entropy(logits, labels))
    accuracy = float((logits.argmax(dim=1) == labels).float().mean())
    model.to("cpu")
    counts = np.bincount(split.labels, minlength=int(logits.shape[1]))
    return Metrics(
        loss=loss,
        accuracy=accuracy,
        examples=len(split),
        label_counts=tuple(int(c) for c in counts),
    )


def seed_for(*, base: int, round_num: int, site_index: int) -> int:
    """A distinct, reproducible seed per (run seed, round, site)."""
    return int(np.random.SeedSequence([base, round_num, site_index]).generate_state(1)[0])
