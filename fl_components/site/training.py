"""Local training and evaluation at a site, in torch (CUDA when present, CPU otherwise).

A participant starts from the global parameters θ_t, trains for a number of local epochs on
its own data, and returns the update Δ = θ_k − θ_t with its number of examples (FedAvg's
weight; McMahan et al. 2017, AISTATS, arXiv:1602.05629, Algorithm 1, ClientUpdate).
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fl_components.config import TrainingConfig
from fl_components.data.types import Split
from fl_components.errors import ConfigError
from fl_components.parameters import NDArrays, get_parameters, set_parameters, subtract
from fl_components.round.types import LocalUpdate, Metrics, SiteInstructions
from fl_components.site.objective import LocalObjective
from fl_components.task.protocol import (
    CLASSIFICATION,
    BoundTask,
    LossFn,
    batch_size_of,
    metric_or_nan,
    to_device,
)


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


def as_dataset(data: Split | Dataset[Any]) -> Dataset[Any]:
    """A task's dataset as it is; a tabular split as (features, label) tensor pairs."""
    if isinstance(data, Split):
        return TensorDataset(torch.from_numpy(data.features), torch.from_numpy(data.labels))
    return data


def seed_worker(worker_id: int) -> None:
    """Seed a loader worker's numpy and ``random`` from the seed torch gave it.

    torch seeds each worker's own generator with a base drawn from the loader's generator
    plus the worker's index; a dataset that augments with numpy or ``random`` draws from
    those, seeded here the same way, so a run with workers repeats.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    data: Split | Dataset[Any],
    *,
    batch_size: int,
    seed: int,
    workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader[Any]:
    """A shuffling loader over a split or dataset, its order fixed by ``seed``.

    ``workers`` processes load the batches (0: this process), each seeded from the loader's
    generator (:func:`seed_worker`); ``pin_memory`` copies batches into page-locked memory
    for an asynchronous copy to the GPU.
    """
    dataset = as_dataset(data)
    generator = torch.Generator().manual_seed(seed)
    size = len(dataset)  # type: ignore[arg-type]
    if workers == 0 and not pin_memory:  # the plain loader, as before the options existed
        return DataLoader(
            dataset, batch_size=max(1, min(batch_size, size)), shuffle=True, generator=generator
        )
    return DataLoader(
        dataset,
        batch_size=max(1, min(batch_size, size)),
        shuffle=True,
        generator=generator,
        num_workers=workers,
        pin_memory=pin_memory,
        worker_init_fn=seed_worker if workers else None,
    )


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """``torch.autocast`` at ``precision`` ('bf16', 'fp16') on ``device``; nothing at 'fp32'."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision]):
        yield


@dataclass
class TrainingRun:
    """What one local training run steps: model, optimizer, batches, loss, objective terms.

    ``adjust_gradients`` adds the strategy's data-independent terms (FedProx's proximal
    gradient, SCAFFOLD's correction) to the gradient before each step; ``close`` undoes
    what a wrapper installed. A :class:`TrainingWrapper` (DP-SGD) returns another run
    around the same model and the same objective. ``loss_fn`` is the task's loss (None:
    cross-entropy); ``task`` gives the step (None: one forward pass and ``loss_fn``).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader[Any]
    loss_fn: LossFn | None = None
    adjust_gradients: Callable[[], None] | None = None
    close: Callable[[], None] | None = None
    task: BoundTask | None = None


class TrainingWrapper(Protocol):
    """Wraps a plain training run (record-level DP: :class:`fl_components.site.dpsgd.DPSGD`).

    It must keep the run's objective: whatever it does to the gradients, the run's
    ``adjust_gradients`` still applies to the gradient the optimizer steps with.
    """

    def wrap(self, run: TrainingRun) -> TrainingRun:
        """The run to train instead of ``run``."""
        ...


def local_step_count(config: TrainingConfig, batches: int) -> int:
    """Optimizer steps of one round: ``training.local_steps``, else epochs x batches.

    Every batch drawn counts, an empty one (DP-SGD's Poisson sampling) included: it is a
    step of the accountant's.
    """
    return config.local_steps if config.local_steps is not None else config.epochs * batches


def train_epochs(
    model: nn.Module,
    loader: DataLoader[Any],
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    device: torch.device,
    loss_fn: LossFn | None = None,
    adjust_gradients: Callable[[], None] | None = None,
    task: BoundTask | None = None,
    steps: int | None = None,
    precision: str = "fp32",
) -> float:
    """Run ``epochs`` passes (or exactly ``steps`` batches); return the last pass's mean loss.

    Each step is the task's (:meth:`BoundTask.train_step`: the loss of one batch), around
    which this loop owns the rest: zero the gradients, back-propagate, ``adjust_gradients()``
    (the strategy's objective terms: FedProx's proximal gradient, SCAFFOLD's correction),
    step. ``steps`` (``training.local_steps``) replaces ``epochs``: passes over the loader
    are repeated until that many batches were drawn, the last pass cut short. ``loss_fn``
    defaults to the task's loss (cross-entropy without a task); DP-SGD passes the criterion
    Opacus wrapped (ghost clipping needs its own). The reported loss is the data loss alone.
    ``precision`` 'bf16' or 'fp16' runs the step under ``torch.autocast``; at 'fp16' a
    gradient scaler scales the loss, and the gradients are unscaled before
    ``adjust_gradients`` so the strategy's terms add to the true gradient.
    """
    stepper = task if task is not None else CLASSIFICATION
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    loss_fn = loss_fn if loss_fn is not None else stepper.loss
    model.train()
    last_loss = float("nan")
    remaining = steps  # batches still to draw; None: whole passes
    passes = epochs if steps is None else steps  # a pass draws at least one batch
    for _ in range(passes):
        if remaining == 0:
            break
        total, count = 0.0, 0
        for batch in loader:
            if remaining == 0:
                break
            if remaining is not None:
                remaining -= 1
            size = batch_size_of(batch)
            if size == 0:  # Poisson sampling (DP) can draw an empty batch
                continue
            loss = _optimizer_step(
                model,
                to_device(batch, device),
                optimizer,
                data_loss=lambda m, b: stepper.train_step(m, b, loss_fn),
                scaler=scaler,
                adjust_gradients=adjust_gradients,
                autocast_to=(precision, device),
            )
            total += loss * size
            count += size
        last_loss = total / max(count, 1)
    return last_loss


def _optimizer_step(
    model: nn.Module,
    batch: Any,
    optimizer: torch.optim.Optimizer,
    *,
    data_loss: Callable[[nn.Module, Any], Any],
    scaler: torch.amp.GradScaler | None,
    adjust_gradients: Callable[[], None] | None,
    autocast_to: tuple[str, torch.device],
) -> float:
    """One step on ``batch``: the loss, back-propagation, the strategy's terms, the update.

    Only the loss runs under autocast (``autocast_to``: precision and device); under a
    gradient scaler (fp16) the gradients are unscaled before ``adjust_gradients``, so the
    strategy's terms add to the true gradient. Returns the batch's data loss.
    """
    optimizer.zero_grad(set_to_none=True)
    with autocast(*autocast_to):
        loss = data_loss(model, batch)  # Tensor.backward: untyped
    if scaler is None:
        loss.backward()
        if adjust_gradients is not None:
            adjust_gradients()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if adjust_gradients is not None:
            adjust_gradients()
        scaler.step(optimizer)  # skipped when a gradient overflowed
        scaler.update()
    return float(loss.detach())


def _refuse_mixed_precision_under_dp(
    config: TrainingConfig, wrapper: TrainingWrapper | None, *, site: str
) -> None:
    """The site's own check (the config refuses this too, but a site never relies on it)."""
    if wrapper is not None and config.precision != "fp32":
        raise ConfigError(
            f"site {site}: training.precision is {config.precision!r} under record-level DP; "
            "Opacus clips per-sample gradients in fp32 and supports neither autocast nor a "
            "gradient scaler: set training.precision: fp32"
        )


def _training_run(
    model: nn.Module,
    config: TrainingConfig,
    loader: DataLoader[Any],
    *,
    objective: LocalObjective,
    task: BoundTask | None,
    wrapper: TrainingWrapper | None,
) -> TrainingRun:
    """The run the site trains: the strategy's objective on the task's loss, DP-SGD around it."""
    run = TrainingRun(
        model=model,
        optimizer=make_optimizer(model, config),
        loader=loader,
        loss_fn=None if task is None else task.loss,
        adjust_gradients=objective.adjust_gradients,
        task=task,
    )
    return run if wrapper is None else wrapper.wrap(run)


def _train_and_close(run: TrainingRun, config: TrainingConfig, *, device: torch.device) -> float:
    """:func:`train_epochs` over ``run`` as ``config`` asks; close the run (DP-SGD's hooks)."""
    try:
        return train_epochs(
            run.model,
            run.loader,
            run.optimizer,
            epochs=config.epochs,
            device=device,
            loss_fn=run.loss_fn,
            adjust_gradients=run.adjust_gradients,
            task=run.task,
            steps=config.local_steps,
            precision=config.precision,
        )
    finally:
        if run.close is not None:
            run.close()


def local_train(
    model: nn.Module,
    global_parameters: NDArrays,
    train: Split | Dataset[Any],
    config: TrainingConfig,
    *,
    site: str,
    round_num: int,
    seed: int,
    instructions: SiteInstructions | None = None,
    folder: Path | None = None,
    wrapper: TrainingWrapper | None = None,
    task: BoundTask | None = None,
) -> LocalUpdate:
    """Train ``model`` from θ_t on ``train`` and return Δ = θ_k − θ_t.

    ``instructions`` come from the strategy (FedProx's μ, SCAFFOLD's c, q-FedAvg's request
    for F_k(θ_t)); ``folder`` is the site's own folder, where SCAFFOLD keeps the site's
    control variate c_i across rounds. ``wrapper`` (DP-SGD) wraps the run: the same
    objective, with its per-sample clipping and noise around the data gradient. ``task``
    gives the loss and the step (None: cross-entropy on (features, label) batches).
    """
    started = time.perf_counter()
    _refuse_mixed_precision_under_dp(config, wrapper, site=site)
    device = pick_device(config.device)
    # the seed reaches the data order through the loader's own generator, never torch's
    # process-wide one (sites train side by side on threads)
    set_parameters(model, global_parameters)
    model.to(device)
    train = as_dataset(train)
    loader = make_loader(
        train,
        batch_size=config.batch_size,
        seed=seed,
        workers=config.loader_workers,
        pin_memory=device.type == "cuda",
    )
    objective = LocalObjective.build(model, global_parameters, instructions, folder=folder)
    initial_loss = (
        evaluate(model, global_parameters, train, device=config.device, task=task).loss
        if instructions is not None and instructions.report_initial_loss
        else None
    )
    model.to(device)
    run = _training_run(model, config, loader, objective=objective, task=task, wrapper=wrapper)
    loss = _train_and_close(run, config, device=device)
    model.to("cpu")
    local = get_parameters(model)
    steps = local_step_count(config, len(run.loader))
    control_delta = objective.finish(local, steps=steps, lr=config.lr)
    return LocalUpdate(
        site=site,
        round=round_num,
        delta=subtract(local, global_parameters),
        num_examples=len(train),  # type: ignore[arg-type]
        train_loss=loss,
        seconds=time.perf_counter() - started,
        control_delta=control_delta,
        initial_loss=initial_loss,
    )


def label_counts(split: Split | Dataset[Any]) -> tuple[int, ...]:
    """The held-out rows per class, for the promotion's majority-class baseline.

    Known for a split and for a (features, integer label) tensor dataset, as the built-in
    tasks give; empty for any other dataset (that rail is then skipped).
    """
    if isinstance(split, Split):
        labels = split.labels
    elif (
        isinstance(split, TensorDataset)
        and len(split.tensors) == 2
        and split.tensors[1].ndim == 1
        and not split.tensors[1].is_floating_point()
    ):
        labels = split.tensors[1].numpy()
    else:
        return ()
    return tuple(int(c) for c in np.bincount(labels)) if len(labels) else ()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    parameters: NDArrays,
    split: Split | Dataset[Any],
    *,
    device: str = "auto",
    task: BoundTask | None = None,
) -> Metrics:
    """The task's loss and accuracy of ``parameters`` on ``split`` (cross-entropy by default)."""
    dataset = as_dataset(split)
    size = len(dataset)  # type: ignore[arg-type]
    if size == 0:
        return Metrics(loss=float("nan"), accuracy=float("nan"), examples=0)
    set_parameters(model, parameters)
    target = pick_device(device)
    model.to(target)
    values = (task if task is not None else CLASSIFICATION).evaluate(model, dataset, target)
    model.to("cpu")
    return Metrics(
        loss=metric_or_nan(values, "loss"),
        accuracy=metric_or_nan(values, "accuracy"),
        examples=size,
        label_counts=label_counts(split),
    )


def seed_for(*, base: int, round_num: int, site_index: int) -> int:
    """A distinct, reproducible seed per (run seed, round, site)."""
    return int(np.random.SeedSequence([base, round_num, site_index]).generate_state(1)[0])
