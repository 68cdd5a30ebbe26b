"""Accuracy against epsilon on the digits federation, and DP-SGD's cost per local epoch.

Runs the core (no Prefect, no MLflow) so that only training is timed:
- a 5-site digits federation (Dirichlet 1.0), FedAvg, record-level DP-SGD at every site with
  target_epsilon 1, 3, 8 over all rounds (Opacus picks sigma), against no DP;
- one local epoch at the largest site, non-private and with each grad-sample mode, timed
  side by side in this process (median of repeats), as a ratio to non-private.

    .venv/bin/python benchmarks/privacy_bench.py   # table on stdout, JSON to results/
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import opacus
import torch

from fl_components.config import FederationConfig
from fl_components.data.site_files import load_site
from fl_components.federation import (
    Site,
    central_test_split,
    dataset_info,
    materialize_sites,
    site_folder,
)
from fl_components.parameters import get_parameters
from fl_components.site.dpsgd import dp_train, plan_round
from fl_components.site.models import build_model
from fl_components.site.training import evaluate, make_loader, make_optimizer, train_epochs
from fl_components.strategies import ServerState, build_strategy

ROUNDS, SITES, EPOCHS = 5, 5, 2
RESULTS = Path(__file__).parent / "results" / "privacy.json"


def federation(root: Path, privacy: dict[str, object]) -> FederationConfig:
    return FederationConfig.model_validate(
        {
            "name": "digits-privacy-bench",
            "rounds": ROUNDS,
            "sites": [{"name": f"site-{i}"} for i in range(SITES)],
            "data": {"dataset": "digits", "alpha": 1.0, "sites_dir": str(root)},
            "model": {"kind": "mlp", "hidden": [128]},
            "training": {"epochs": EPOCHS, "batch_size": 32, "lr": 0.1, "momentum": 0.9},
            "privacy": privacy,
            "seed": 0,
        }
    )


def run_federation(config: FederationConfig) -> tuple[float, float]:
    """Final central-test accuracy and the largest site epsilon."""
    materialize_sites(config)
    info = dataset_info(config)
    model = build_model(config.model, info, seed=config.seed)
    state = ServerState(round=0, parameters=get_parameters(model))
    strategy = build_strategy(config.strategy)
    epsilon = 0.0
    for round_num in range(1, config.rounds + 1):
        updates = []
        for index, name in enumerate(config.site_names):
            site = Site(name=name, folder=site_folder(config, name), config=config, info=info)
            update = site.train(state.parameters, round_num=round_num, seed=index + 100 * round_num)
            epsilon = max(epsilon, update.extra.get("epsilon", 0.0))
            updates.append(update)
        state = strategy.apply(state, strategy.aggregate(updates, state))
    test = central_test_split(config)
    score = evaluate(build_model(config.model, info, seed=0), state.parameters, test, device="cpu")
    return score.accuracy, epsilon


def epoch_cost(config: FederationConfig, repeats: int = 5) -> dict[str, float]:
    """Seconds per local epoch at the largest site: non-private and per grad-sample mode."""
    info = dataset_info(config)
    splits = [load_site(site_folder(config, n)).train for n in config.site_names]
    train = max(splits, key=len)
    one_epoch = config.training.model_copy(update={"epochs": 1})
    plan = plan_round(examples=len(train), privacy=config.privacy, training=one_epoch, rounds=1)
    cpu = torch.device("cpu")
    timings: dict[str, list[float]] = {
        m: [] for m in ("non-private", "ew", "ghost", "hooks", "functorch")
    }
    for _ in range(repeats):  # interleaved, so that machine load hits every mode alike
        for mode in timings:
            model = build_model(config.model, info, seed=0)
            started = time.perf_counter()
            if mode == "non-private":
                loader = make_loader(train, batch_size=one_epoch.batch_size, seed=0)
                train_epochs(model, loader, make_optimizer(model, one_epoch), epochs=1, device=cpu)
            else:
                dp_train(model, train, one_epoch, plan=plan, grad_sample_mode=mode, device=cpu)
            timings[mode].append(time.perf_counter() - started)
    seconds = {mode: statistics.median(values) for mode, values in timings.items()}
    seconds["examples"] = float(len(train))
    return seconds


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for target in (None, 1.0, 3.0, 8.0):
            root = Path(tmp) / f"eps-{target}"  # fresh ledgers for every setting
            privacy = (
                {"mode": "off"}
                if target is None
                else {"mode": "record", "target_epsilon": target, "delta": 1e-5}
            )
            config = federation(root, privacy)
            started = time.perf_counter()
            accuracy, epsilon = run_federation(config)
            rows.append(
                {
                    "target_epsilon": target,
                    "epsilon_spent": epsilon if target is not None else None,
                    "accuracy": accuracy,
                    "seconds": time.perf_counter() - started,
                }
            )
        cost_config = federation(
            Path(tmp) / "eps-3.0", {"mode": "record", "noise_multiplier": 1.1, "delta": 1e-5}
        )
        cost = epoch_cost(cost_config)
    ratios = {m: cost[m] / cost["non-private"] for m in ("ew", "ghost", "hooks", "functorch")}

    print(f"digits, {SITES} sites, {ROUNDS} rounds x {EPOCHS} epochs, MLP(128), delta 1e-5")
    print(f"{'target eps':>10}  {'eps spent':>9}  {'accuracy':>8}  {'seconds':>7}")
    for row in rows:
        target = "no DP" if row["target_epsilon"] is None else f"{row['target_epsilon']:g}"
        spent = "—" if row["epsilon_spent"] is None else f"{row['epsilon_spent']:.3f}"
        print(f"{target:>10}  {spent:>9}  {row['accuracy']:>8.4f}  {row['seconds']:>7.1f}")
    print(f"\nDP-SGD cost per local epoch ({int(cost['examples'])} examples, 1 thread):")
    print(f"  non-private {cost['non-private'] * 1000:.1f} ms")
    for mode, ratio in ratios.items():
        print(f"  {mode:<10} {cost[mode] * 1000:7.1f} ms  {ratio:.2f}x")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "privacy",
                "command": "python benchmarks/privacy_bench.py",
                "setup": {"sites": SITES, "rounds": ROUNDS, "epochs": EPOCHS, "delta": 1e-5},
                "accuracy_vs_epsilon": rows,
                "epoch_seconds": cost,
                "cost_ratio": ratios,
                "versions": {
                    "python": sys.version.split()[0],
                    "torch": torch.__version__,
                    "opacus": opacus.__version__,
                    "platform": platform.platform(),
                },
            },
            indent=2,
        )
    )
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
