"""Federation-wide scaling against per-site scaling, on branches whose clients differ.

Four bank branches whose clients earn on different scales (branch means of income 30k to
75k) and whose default risk depends on the absolute income: per-site standardization
centres every branch at 0 and hides that; the federation's scale keeps it. Prints a table:
the data.scale, the federation's weighted test accuracy after 10 rounds of the bare loop
(``fl_components.round.planning.simulate``, the flow's engine), and seconds.

    python -m benchmarks.federated_scaling [--secure]

``--secure`` forms the federation's statistics under secure aggregation (the bare loop then
trains in the clear). Measured: none 0.870, site 0.674, federation 0.928; pooled scikit-learn
0.929.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fl_components.config import FederationConfig
from fl_components.federated_statistics import with_federation_scaling
from fl_components.federation import Site, dataset_info
from fl_components.round.planning import simulate

SIZES = {"north": 800, "south": 2400, "east": 400, "west": 1600}
CENTRES = {"north": 30_000, "south": 45_000, "east": 60_000, "west": 75_000}


def write_branches(root: Path, *, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for site, rows in SIZES.items():
        income = rng.normal(CENTRES[site], 8_000, rows)
        age = rng.normal(45, 12, rows)
        debt = rng.normal(20_000, 6_000, rows)
        score = (income - 52_000) / 10_000 - (debt - 20_000) / 8_000 + rng.normal(0, 0.5, rows)
        frame = pd.DataFrame({"income": income, "age": age, "debt": debt, "label": score > 0})
        frame["label"] = frame["label"].astype(int)
        (root / site).mkdir(parents=True, exist_ok=True)
        cut = int(rows * 0.8)
        frame.iloc[:cut].to_csv(root / site / "train.csv", index=False)
        frame.iloc[cut:].to_csv(root / site / "test.csv", index=False)


def config(root: Path, scale: str, *, secure: bool) -> FederationConfig:
    return FederationConfig.model_validate(
        {
            "name": "branches",
            "rounds": 10,
            "sites": [{"name": s, "data_path": str(root / s)} for s in SIZES],
            "participation": {"fraction": 1.0, "min_participants": 3},
            "data": {
                "source": "site_files",
                "columns": ["income", "age", "debt"],
                "n_classes": 2,
                "scale": scale,
                "sites_dir": str(root / "federation"),
            },
            "secure_aggregation": {"enabled": secure, "threshold": 3 if secure else None},
            "model": {"kind": "logreg"},
            "training": {"epochs": 1, "lr": 0.05, "momentum": 0.0, "device": "cpu"},
            "seed": 3,
        }
    )


def accuracy(cfg: FederationConfig) -> float:
    state, _ = simulate(cfg)
    info = dataset_info(cfg)
    scores = [
        Site(site.name, Path(site.data_path or ""), cfg, info).evaluate(state.parameters)
        for site in cfg.sites
    ]
    return sum(m.accuracy * m.examples for m in scores) / sum(m.examples for m in scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--secure", action="store_true", help="secure aggregation on")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fedpipe-scaling-"))
    write_branches(root)
    print(f"{'data.scale':<12} {'accuracy':>9} {'seconds':>8}")
    for scale in ("none", "site", "federation"):
        started = time.perf_counter()
        cfg = with_federation_scaling(config(root, scale, secure=args.secure))
        print(f"{scale:<12} {accuracy(cfg):>9.3f} {time.perf_counter() - started:>8.1f}")
    print(f"{'pooled':<12} {pooled_accuracy(root):>9.3f}   (scikit-learn, all rows in one place)")


def pooled_accuracy(root: Path) -> float:
    """The centralized reference: one logistic regression on every branch's rows, scaled."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train = pd.concat([pd.read_csv(root / s / "train.csv") for s in SIZES])
    test = pd.concat([pd.read_csv(root / s / "test.csv") for s in SIZES])
    model = make_pipeline(StandardScaler(), LogisticRegression())
    model.fit(train.drop(columns="label"), train["label"])
    return float(model.score(test.drop(columns="label"), test["label"]))


if __name__ == "__main__":
    main()
