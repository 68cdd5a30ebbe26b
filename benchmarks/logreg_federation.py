"""A bare federation of multinomial logistic regression, each round one ``engine.run_round``.

What the strategies and robustness benchmarks share: the sites' local SGD (numpy, with
FedProx's proximal gradient and SCAFFOLD's correction; tests/strategies/test_bench_trainer.py
checks it against the torch functions the sites use), SCAFFOLD's c_i update
(``scaffold_client_control``), the engine's dispatch for sites in this process
(:class:`BenchSites`, where an attack can replace the attackers' updates) and the loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fl_components.data.site_files import partition_bundled
from fl_components.data.types import SiteData, Split
from fl_components.errors import RoundError
from fl_components.parameters import NDArrays, get_parameters, subtract
from fl_components.round.engine import RoundPlan, run_round
from fl_components.round.types import Dropout, LocalUpdate, SiteJob, SiteResult
from fl_components.site.objective import scaffold_client_control
from fl_components.site.training import seed_for
from fl_components.strategies import SiteInstructions, Strategy

Attack = Callable[[list[LocalUpdate], np.random.Generator], list[LocalUpdate]]


def bench_sites(
    dataset: str,
    *,
    n_sites: int,
    prefix: str,
    alpha: float,
    seed: int,
    partitioner: str = "dirichlet",
) -> tuple[list[SiteData], Split]:
    """The benchmarks' split: 20% central test, 1% of each site kept for its own test."""
    return partition_bundled(
        dataset=dataset,
        site_names=tuple(f"{prefix}-{i:02d}" for i in range(n_sites)),
        partitioner=partitioner,
        alpha=alpha,
        shards_per_site=1,
        quantity_sigma=1.0,
        test_fraction=0.2,
        site_test_fraction=0.01,
        seed=seed,
    )


@dataclass(frozen=True)
class LocalSetup:
    """Local training at every site: plain SGD (SCAFFOLD's option II assumes it)."""

    lr: float
    batch_size: int
    epochs: int


def softmax_loss_grad(
    weight: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean cross-entropy of softmax(x Wᵀ + b) and its gradient in (W, b)."""
    logits = x @ weight.T + bias
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    loss = float(-np.log(probs[rows, y] + 1e-12).mean())
    probs[rows, y] -= 1.0
    probs /= len(y)
    return loss, probs.T @ x, probs.sum(axis=0)


def logreg_sgd(
    global_parameters: NDArrays,
    split: Split,
    *,
    setup: LocalSetup,
    seed: int,
    mu: float,
    correction: NDArrays | None,
) -> tuple[NDArrays, int, float]:
    """Local SGD of multinomial logistic regression ([W (k, d), b (k)], nn.Linear's order).

    The gradient is cross-entropy's plus μ(θ − θ_t) (the gradient of FedProx's
    ``proximal_penalty``) plus SCAFFOLD's c − c_i (``scaffold_correct_gradients``); numpy,
    because on a loaded 2-core machine torch's per-step overhead is ~15x this model's maths.
    """
    anchor = [np.asarray(a, dtype=np.float64) for a in global_parameters]
    weight, bias = (a.copy() for a in anchor)
    x, y = split.features.astype(np.float64), split.labels
    rng = np.random.default_rng(seed)
    steps, loss = 0, float("nan")
    for _ in range(setup.epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), setup.batch_size):
            batch = order[start : start + setup.batch_size]
            loss, grad_w, grad_b = softmax_loss_grad(weight, bias, x[batch], y[batch])
            if mu > 0:
                grad_w += mu * (weight - anchor[0])
                grad_b += mu * (bias - anchor[1])
            if correction is not None:
                grad_w += correction[0]
                grad_b += correction[1]
            weight -= setup.lr * grad_w
            bias -= setup.lr * grad_b
            steps += 1
    return [weight.astype(np.float32), bias.astype(np.float32)], steps, loss


def train_site(
    global_parameters: NDArrays,
    site: SiteData,
    instructions: SiteInstructions,
    *,
    setup: LocalSetup,
    seed: int,
    round_num: int,
    client_control: NDArrays | None,
) -> tuple[LocalUpdate, NDArrays | None]:
    """One site's round: FedProx's term, SCAFFOLD's correction, q-FedAvg's F_k(θ_t)."""
    started = time.perf_counter()
    initial_loss = None
    if instructions.report_initial_loss:
        x = site.train.features.astype(np.float64)
        initial_loss, _, _ = softmax_loss_grad(
            global_parameters[0].astype(np.float64),
            global_parameters[1].astype(np.float64),
            x,
            site.train.labels,
        )
    server_control = instructions.server_control
    c_i = None
    correction = None
    if server_control is not None:
        c_i = client_control or [np.zeros_like(a) for a in global_parameters]
        correction = subtract(list(server_control), c_i)  # g ← g − c_i + c
    local, steps, loss = logreg_sgd(
        global_parameters,
        site.train,
        setup=setup,
        seed=seed,
        mu=instructions.proximal_mu,
        correction=correction,
    )
    new_control, control_delta = None, None
    if server_control is not None and c_i is not None:
        new_control = scaffold_client_control(
            c_i, list(server_control), global_parameters, local, steps=steps, lr=setup.lr
        )
        control_delta = subtract(new_control, c_i)
    update = LocalUpdate(
        site=site.name,
        round=round_num,
        delta=subtract(local, global_parameters),
        num_examples=len(site.train),
        train_loss=loss,
        seconds=time.perf_counter() - started,
        control_delta=control_delta,
        initial_loss=initial_loss,
    )
    return update, new_control


def accuracy(parameters: NDArrays, split: Split) -> float:
    """Share of ``split`` that argmax(x Wᵀ + b) labels right."""
    logits = split.features @ parameters[0].T + parameters[1]
    return float((logits.argmax(axis=1) == split.labels).mean())


class BenchSites:
    """The round engine's dispatch for the bare loop: every job runs :func:`train_site` here.

    Sites keep SCAFFOLD's c_i between rounds (in memory: each site's own state); an
    ``attack`` replaces the attackers' updates before they are answered, as a compromised
    site would.
    """

    def __init__(
        self,
        sites: Sequence[SiteData],
        *,
        setup: LocalSetup,
        attack: Attack | None,
        rng: np.random.Generator,
    ) -> None:
        self.sites = {s.name: s for s in sites}
        self.setup, self.attack, self.rng = setup, attack, rng
        self.controls: dict[str, NDArrays] = {}

    def __call__(self, jobs: Sequence[SiteJob]) -> dict[str, SiteResult | Dropout]:
        """Train every job's site; return each site's result."""
        updates = []
        for job in jobs:
            if job.parameters is None:
                raise RoundError(f"bench: job for {job.site} carries no model")
            update, control = train_site(
                job.parameters,
                self.sites[job.site],
                job.instructions,
                setup=self.setup,
                seed=job.seed,
                round_num=job.round,
                client_control=self.controls.get(job.site),
            )
            if control is not None:
                self.controls[job.site] = control
            updates.append(update)
        if self.attack is not None:
            updates = self.attack(updates, self.rng)
        return {u.site: SiteResult(site=u.site, update=u) for u in updates}


def run_federation(
    strategy: Strategy,
    sites: Sequence[SiteData],
    test: Split,
    *,
    rounds: int,
    per_round: int,
    setup: LocalSetup,
    seed: int,
    attack: Attack | None = None,
) -> list[float]:
    """Accuracy on ``test`` after each round, each round one ``engine.run_round`` call."""
    n_classes = max(int(test.labels.max()), *(int(s.train.labels.max()) for s in sites)) + 1
    torch.manual_seed(seed)  # nn.Linear's own initialization, as the project's logreg model
    model = nn.Linear(sites[0].train.features.shape[1], n_classes)
    state = strategy.initial_state(get_parameters(model))
    selection = np.random.default_rng([seed, 0x5E1])
    dispatch = BenchSites(
        sites, setup=setup, attack=attack, rng=np.random.default_rng([seed, 0xA77])
    )
    names = [s.name for s in sites]
    accuracies = []
    for round_num in range(1, rounds + 1):
        chosen = sorted(int(i) for i in selection.choice(len(sites), size=per_round, replace=False))
        plan = RoundPlan(
            round=round_num,
            selected=tuple(names[i] for i in chosen),
            seeds={
                names[i]: seed_for(base=seed, round_num=round_num, site_index=i) for i in chosen
            },
            min_participants=1,
        )
        state, _ = run_round(state, plan, dispatch, strategy)
        accuracies.append(accuracy(state.parameters, test))
    return accuracies
