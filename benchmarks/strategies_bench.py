"""Strategies benchmark: FedAvg, FedProx (μ = 1), SCAFFOLD, FedAdam, FedYogi on non-IID data.

Two federations, each strategy run from the same initial model with the same participants
per round and the same local seeds (per seed), and scored every round on the pooled test
split:

- Synthetic(1, 1) of the FedProx paper (Li et al. 2020, arXiv:1812.06127, Sec. 5.1): 30
  devices, 10 per round, multinomial logistic regression, local SGD lr 0.01, batch 10, 20
  local epochs (``--epochs``);
- digits split Dirichlet α = 0.1 over 10 sites, all 10 per round, logistic regression.

Final accuracy (mean of the last 3 rounds) and rounds to a target accuracy, over seeds.
The loop below is a bare federation over the Strategy interface (configure / aggregate /
apply); local training is numpy logistic regression whose gradient carries FedProx's and
SCAFFOLD's terms (tests/strategies/test_bench_trainer.py checks it against the torch
functions the sites use), and SCAFFOLD's c_i update is ``scaffold_client_control``.

    .venv/bin/python -m benchmarks.strategies_bench [--rounds 40 --seeds 3 --epochs 20]
    .venv/bin/python -m benchmarks.strategies_bench --plot-only   # PNGs from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fl_components.config import StrategyConfig
from fl_components.data import SiteData, Split, partition_bundled
from fl_components.parameters import NDArrays, get_parameters, subtract
from fl_components.strategies import SiteInstructions, Strategy, build_strategy
from fl_components.strategies.scaffold import scaffold_client_control
from fl_components.training import LocalUpdate, seed_for

RESULTS = Path(__file__).resolve().parent / "results"
Attack = Callable[[list[LocalUpdate], np.random.Generator], list[LocalUpdate]]


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
    """Accuracy on ``test`` after each round of a bare federation (logistic regression)."""
    n_classes = max(int(test.labels.max()), *(int(s.train.labels.max()) for s in sites)) + 1
    torch.manual_seed(seed)  # nn.Linear's own initialization, as the project's logreg model
    model = nn.Linear(sites[0].train.features.shape[1], n_classes)
    state = strategy.initial_state(get_parameters(model))
    selection = np.random.default_rng([seed, 0x5E1])
    attack_rng = np.random.default_rng([seed, 0xA77])
    controls: dict[str, NDArrays] = {}
    accuracies = []
    names = [s.name for s in sites]
    for round_num in range(1, rounds + 1):
        chosen = sorted(selection.choice(len(sites), size=per_round, replace=False))
        plan = strategy.configure(round_num, state, [names[i] for i in chosen])
        updates = []
        for i in chosen:
            update, control = train_site(
                state.parameters,
                sites[i],
                plan[names[i]],
                setup=setup,
                seed=seed_for(base=seed, round_num=round_num, site_index=int(i)),
                round_num=round_num,
                client_control=controls.get(names[i]),
            )
            if control is not None:
                controls[names[i]] = control
            updates.append(update)
        if attack is not None:
            updates = attack(updates, attack_rng)
        state = strategy.apply(state, strategy.aggregate(updates, state))
        accuracies.append(accuracy(state.parameters, test))
    return accuracies


def rounds_to(curve: Sequence[float], target: float) -> int | None:
    """The first round (1-based) whose accuracy reaches ``target``; None if never."""
    return next((i + 1 for i, a in enumerate(curve) if a >= target), None)


def summarize(curves: Sequence[Sequence[float]], target: float) -> dict[str, Any]:
    """Final accuracy (mean of the last 3 rounds) and rounds to target, over seeds."""
    finals = [float(np.mean(c[-3:])) for c in curves]
    reached = [rounds_to(c, target) for c in curves]
    hit = [r for r in reached if r is not None]
    return {
        "final_accuracy_mean": statistics.fmean(finals),
        "final_accuracy_std": statistics.pstdev(finals),
        f"rounds_to_{target:g}": statistics.median(hit) if hit else None,
        "seeds_reaching_target": f"{len(hit)}/{len(curves)}",
        # round-to-round swing of the last half: how steady the curve is
        "swing_last_half": statistics.fmean(
            float(np.mean(np.abs(np.diff(c[len(c) // 2 :])))) for c in curves
        ),
    }


STRATEGIES: dict[str, dict[str, Any]] = {
    "fedavg": {"name": "fedavg"},
    "fedprox_mu1": {"name": "fedprox", "proximal_mu": 1.0},
    "scaffold": {"name": "scaffold"},
    "fedadam": {"name": "fedadam", "server_lr": 0.1},
    "fedyogi": {"name": "fedyogi", "server_lr": 0.1},
}


def federations(seed: int) -> dict[str, tuple[list[SiteData], Split, int]]:
    """The two data sets: (sites, pooled test split, sites per round)."""
    synthetic = partition_bundled(
        dataset="synthetic",
        site_names=tuple(f"device-{i:02d}" for i in range(30)),
        partitioner="iid",
        alpha=1.0,
        shards_per_site=1,
        quantity_sigma=1.0,
        test_fraction=0.2,
        site_test_fraction=0.01,
        seed=seed,
        synthetic_alpha=1.0,
        synthetic_beta=1.0,
    )
    digits = partition_bundled(
        dataset="digits",
        site_names=tuple(f"site-{i:02d}" for i in range(10)),
        partitioner="dirichlet",
        alpha=0.1,
        shards_per_site=1,
        quantity_sigma=1.0,
        test_fraction=0.2,
        site_test_fraction=0.01,
        seed=seed,
    )
    return {"synthetic_1_1": (*synthetic, 10), "digits_dirichlet_0.1": (*digits, 10)}


def machine() -> dict[str, Any]:
    """Where the figures were measured."""
    return {"cpu": platform.machine(), "cores": os.cpu_count(), "threads": 1}


def versions() -> dict[str, str]:
    """Library versions the figures were measured with."""
    return {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def plot_curves(curves: dict[str, dict[str, list[list[float]]]], path: Path, title: str) -> None:
    """One panel per data set: mean accuracy per round for each strategy (band: min-max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4), squeeze=False)
    for ax, (dataset, by_rule) in zip(axes[0], curves.items(), strict=True):
        for rule, runs in by_rule.items():
            data = np.array(runs)
            x = np.arange(1, data.shape[1] + 1)
            ax.plot(x, data.mean(axis=0), label=rule)
            ax.fill_between(x, data.min(axis=0), data.max(axis=0), alpha=0.15)
        ax.set(title=dataset, xlabel="round", ylabel="test accuracy")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


TARGETS = {"synthetic_1_1": 0.7, "digits_dirichlet_0.1": 0.9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20, help="local epochs on Synthetic")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    out = RESULTS / "strategies.json"
    png = RESULTS / "strategies.png"
    if args.plot_only:
        plot_curves(json.loads(out.read_text())["curves"], png, "Strategies on non-IID data")
        return
    torch.set_num_threads(1)
    setups = {
        "synthetic_1_1": LocalSetup(lr=0.01, batch_size=10, epochs=args.epochs),
        "digits_dirichlet_0.1": LocalSetup(lr=0.05, batch_size=10, epochs=5),
    }
    curves: dict[str, dict[str, list[list[float]]]] = {k: {} for k in setups}
    started = time.perf_counter()
    for seed in range(args.seeds):
        for dataset, (sites, test, per_round) in federations(seed).items():
            for label, raw in STRATEGIES.items():
                strategy = build_strategy(
                    StrategyConfig(**raw), num_sites=len(sites), local_lr=setups[dataset].lr
                )
                curve = run_federation(
                    strategy,
                    sites,
                    test,
                    rounds=args.rounds,
                    per_round=per_round,
                    setup=setups[dataset],
                    seed=seed,
                )
                curves[dataset].setdefault(label, []).append(curve)
                print(f"seed {seed} {dataset:<22} {label:<12} final {curve[-1]:.3f}", flush=True)
    table = [
        {"dataset": dataset, "strategy": label, **summarize(runs, TARGETS[dataset])}
        for dataset, by_rule in curves.items()
        for label, runs in by_rule.items()
    ]
    for row in table:
        print(row)
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = (
        f"python -m benchmarks.strategies_bench --rounds {args.rounds} --seeds {args.seeds} "
        f"--epochs {args.epochs}"
    )
    plot_curves(curves, png, "Strategies on non-IID data")
    out.write_text(
        json.dumps(
            {
                "title": "Strategies: FedAvg, FedProx, SCAFFOLD, FedAdam, FedYogi on non-IID data",
                "command": command,
                "machine": machine(),
                "date": datetime.now(UTC).strftime("%Y-%m-%d"),
                "notes": [
                    "![accuracy per round](benchmarks/results/strategies.png)",
                    *NOTES,
                ],
                "summary": table,
                "setup": {
                    name: {**vars(s), "rounds": args.rounds, "seeds": args.seeds}
                    for name, s in setups.items()
                },
                "strategies": {k: json.dumps(v) for k, v in STRATEGIES.items()},
                "seconds": round(time.perf_counter() - started, 1),
                "versions": versions(),
                "curves": curves,
            },
            indent=1,
        )
    )
    print(f"wrote {out} and {png}")


NOTES: list[str] = []

if __name__ == "__main__":
    main()
