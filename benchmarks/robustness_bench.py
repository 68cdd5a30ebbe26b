"""Robustness benchmark: 20% of sites attack; FedAvg against the robust aggregation rules.

digits split Dirichlet α = 1 over 15 sites, all 15 in every round, multinomial logistic
regression (the bare federation of :mod:`benchmarks.logreg_federation`). Three sites (20%)
replace their update every round by

- ``sign_flip_x5``: −5 Δ (Blanchard et al. 2017's omniscient direction, scaled),
- ``scaled_x10``: 10 Δ (a boosted update, Bhagoji et al. 2019),
- ``gaussian``: N(0, σ²) per coordinate, σ = 1 (Blanchard et al. 2017, Sec. 5),

and each rule runs on the same sites, seeds and participants: the mean (FedAvg), the
coordinate-wise median and trimmed mean (β = 0.2; Yin et al. 2018), Krum and Bulyan
(f = 3; n = 15 = 4f + 3), and norm bounding (Sun et al. 2019) at M = the median honest
update norm of round 1 of the clean run.

    .venv/bin/python -m benchmarks.robustness_bench [--rounds 20 --seeds 2]
    .venv/bin/python -m benchmarks.robustness_bench --plot-only
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.logreg_federation import (
    Attack,
    LocalSetup,
    bench_sites,
    run_federation,
    train_site,
)
from benchmarks.strategies_bench import RESULTS, machine, versions
from fl_components.config import StrategyConfig
from fl_components.parameters import flatten
from fl_components.round.types import LocalUpdate
from fl_components.strategies import SiteInstructions, build_strategy

SITES, ATTACKERS, F = 15, 3, 3
SETUP = LocalSetup(lr=0.05, batch_size=10, epochs=2)
ATTACKER_NAMES = {f"site-{i:02d}" for i in range(ATTACKERS)}


def attack(kind: str) -> Attack:
    """Replace the attackers' updates (sites site-00..site-02) as ``kind`` says."""

    def tamper(updates: list[LocalUpdate], rng: np.random.Generator) -> list[LocalUpdate]:
        out = []
        for u in updates:
            if u.site not in ATTACKER_NAMES:
                out.append(u)
                continue
            if kind == "sign_flip_x5":
                delta = [(-5.0 * d).astype(np.float32) for d in u.delta]
            elif kind == "scaled_x10":
                delta = [(10.0 * d).astype(np.float32) for d in u.delta]
            else:
                delta = [rng.normal(0, 1.0, d.shape).astype(np.float32) for d in u.delta]
            out.append(replace(u, delta=delta))
        return out

    return tamper


def honest_norm(sites: list[Any], seed: int) -> float:
    """The median update norm of round 1 from the initial model (the norm bound M)."""
    import torch
    from torch import nn

    from fl_components.parameters import get_parameters

    torch.manual_seed(seed)
    start = get_parameters(nn.Linear(sites[0].train.features.shape[1], 10))
    norms = [
        float(
            np.linalg.norm(
                flatten(
                    train_site(
                        start,
                        s,
                        SiteInstructions(),
                        setup=SETUP,
                        seed=seed,
                        round_num=1,
                        client_control=None,
                    )[0].delta
                )
            )
        )
        for s in sites
        if s.name not in ATTACKER_NAMES
    ]
    return float(np.median(norms))


def rules(norm_bound: float) -> dict[str, dict[str, Any]]:
    """Each rule's strategy section (all on FedAvg's server step)."""
    return {
        "fedavg_mean": {"name": "fedavg"},
        "median": {"aggregator": "median"},
        "trimmed_mean_0.2": {"aggregator": "trimmed_mean", "trim_beta": 0.2},
        "krum_f3": {"aggregator": "krum", "byzantine_f": F},
        "bulyan_f3": {"aggregator": "bulyan", "byzantine_f": F},
        "norm_bound": {"norm_bound": round(norm_bound, 4)},
    }


def plot_bars(table: list[dict[str, Any]], path: Path) -> None:
    """Final accuracy per rule, one group of bars per attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = list(dict.fromkeys(r["attack"] for r in table))
    names = list(dict.fromkeys(r["rule"] for r in table))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(9, 4))
    for j, name in enumerate(names):
        values = [
            next(r["final_accuracy_mean"] for r in table if r["rule"] == name and r["attack"] == a)
            for a in attacks
        ]
        ax.bar(np.arange(len(attacks)) + j * width, values, width, label=name)
    ax.set_xticks(np.arange(len(attacks)) + 0.4 - width / 2, attacks)
    ax.set(ylabel="final test accuracy", ylim=(0, 1.2), title="3 of 15 sites attacking (digits)")
    ax.legend(fontsize=7, ncol=6, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def directions(table: list[dict[str, Any]]) -> list[str]:
    """The expected directions: FedAvg collapses (> 20 points), robust rules hold (<= 5).

    Both measured against the clean FedAvg run.
    """
    notes = []
    for attack_kind in ("sign_flip_x5", "scaled_x10", "gaussian"):
        rows = [r for r in table if r["attack"] == attack_kind]
        fedavg = next(r for r in rows if r["rule"] == "fedavg_mean")
        collapsed = fedavg["points_below_clean_fedavg"] > 20
        held = [
            r["rule"]
            for r in rows
            if r["rule"] != "fedavg_mean" and r["points_below_clean_fedavg"] <= 5
        ]
        lost = [
            f"{r['rule']} ({r['points_below_clean_fedavg']:.1f})"
            for r in rows
            if r["rule"] != "fedavg_mean" and r["points_below_clean_fedavg"] > 5
        ]
        notes.append(
            f"{attack_kind}: FedAvg {fedavg['points_below_clean_fedavg']:.1f} points below "
            f"clean ({'collapses, agrees' if collapsed else 'does NOT collapse'}); within 5 "
            f"points: {', '.join(held) or 'none'}; further: {', '.join(lost) or 'none'}"
        )
    return notes


NOTES = [
    "scaled_x10 is not an attack on this convex model: the attackers' own updates point the "
    "honest way, so 10x of them only lengthens FedAvg's step ((12 + 3 x 10) / 15 = 2.8 times "
    "the mean). Boosting harms when the boosted direction is malicious (model replacement, "
    "Bhagoji et al. 2019), which sign_flip_x5 measures.",
    "Krum and Bulyan lose points even on the clean run: they keep one update (Krum) or average, "
    "per coordinate, the values nearest the median of n - 2f Krum picks (Bulyan), and with "
    "Dirichlet(1) labels one site's update misses other sites' labels; Blanchard et al. and "
    "El Mhamdi et al. measured IID data. Their figures are the same under every attack "
    "because the attackers are never selected: the run equals one without the three.",
    "Under sign_flip_x5 the median, trimmed mean and norm bounding stay far above FedAvg "
    "but below their clean runs: 3 of 15 flipped, boosted values shift every coordinate's "
    "order statistics toward the attack (Yin et al. 2018's error bound grows with the "
    "Byzantine share and the sites' heterogeneity), and a bounded attacker still pushes "
    "with norm M against the honest direction.",
]


def notes(table: list[dict[str, Any]]) -> list[str]:
    """The plot, the measured directions, and why some differ from expectation."""
    return [
        "![final accuracy per rule and attack](benchmarks/results/robustness.png)",
        *directions(table),
        *NOTES,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    out, png = RESULTS / "robustness.json", RESULTS / "robustness.png"
    if args.plot_only:  # the plot and the notes are functions of the stored summary
        data = json.loads(out.read_text())
        plot_bars(data["summary"], png)
        data["notes"] = notes(data["summary"])
        out.write_text(json.dumps(data, indent=1))
        return
    started = time.perf_counter()
    finals: dict[tuple[str, str], list[float]] = {}
    bounds = []
    for seed in range(args.seeds):
        sites, test = bench_sites("digits", n_sites=SITES, prefix="site", alpha=1.0, seed=seed)
        bound = honest_norm(sites, seed)
        bounds.append(bound)
        for kind in ("clean", "sign_flip_x5", "scaled_x10", "gaussian"):
            for name, raw in rules(bound).items():
                strategy = build_strategy(StrategyConfig(**raw), num_sites=SITES)
                curve = run_federation(
                    strategy,
                    sites,
                    test,
                    rounds=args.rounds,
                    per_round=SITES,
                    setup=SETUP,
                    seed=seed,
                    attack=None if kind == "clean" else attack(kind),
                )
                finals.setdefault((name, kind), []).append(float(np.mean(curve[-3:])))
                print(f"seed {seed} {kind:<13} {name:<17} {curve[-1]:.3f}", flush=True)
    clean = statistics.fmean(finals[("fedavg_mean", "clean")])
    table = [
        {
            "attack": kind,
            "rule": name,
            "final_accuracy_mean": statistics.fmean(values),
            "final_accuracy_std": statistics.pstdev(values),
            "points_below_clean_fedavg": 100 * (clean - statistics.fmean(values)),
            "points_below_own_clean": 100
            * (statistics.fmean(finals[(name, "clean")]) - statistics.fmean(values)),
        }
        for (name, kind), values in finals.items()
    ]
    table.sort(key=lambda r: (r["attack"] != "clean", r["attack"], r["rule"]))
    for row in table:
        print(row)
    plot_bars(table, png)
    out.write_text(
        json.dumps(
            {
                "title": "Robustness: 20% of sites attacking, FedAvg against robust rules",
                "command": f"python -m benchmarks.robustness_bench --rounds {args.rounds} "
                f"--seeds {args.seeds}",
                "machine": machine(),
                "date": datetime.now(UTC).strftime("%Y-%m-%d"),
                "notes": notes(table),
                "summary": table,
                "setup": {
                    "sites": SITES,
                    "attackers": ATTACKERS,
                    "byzantine_f": F,
                    "rounds": args.rounds,
                    "seeds": args.seeds,
                    **vars(SETUP),
                    "norm_bound_per_seed": bounds,
                },
                "seconds": round(time.perf_counter() - started, 1),
                "versions": versions(),
            },
            indent=1,
        )
    )
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
