"""Foundation benchmark: the demo federation against a centralized baseline, and the
Prefect flow against a bare Python loop calling the same fl_components functions.

Prints two tables and writes ``benchmarks/results/foundation.json``.

    .venv/bin/python -m benchmarks.foundation_bench [--rounds 20]

1. Accuracy: the demo federation's final global accuracy on the central test split, and the
   same model trained centrally on the pooled training data of all sites for the same
   number of passes (rounds x local epochs), same optimizer and batch size.
2. Orchestration overhead: the same federation (a) as the Prefect flow, ephemeral Prefect
   (its start measured apart), and (b) as a bare loop; wall time and median round time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "foundation.json"


def _config(workdir: Path, rounds: int) -> Any:
    from fl_components.config import FederationConfig

    return FederationConfig.model_validate(
        {
            "name": "bench-digits",
            "rounds": rounds,
            "data": {"sites_dir": str(workdir / "sites")},
            "tracking": {
                "tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}",
                "artifact_root": str(workdir / "artifacts"),
                "register_model": True,
            },
        }
    )


def bare_loop(config: Any) -> dict[str, Any]:
    """The federation as a plain loop over the very round engine the flow runs.

    ``fl_components.round.planning.simulate``: the same ``run_round``, strategy, selection, seeds
    and folded evaluation as the flow; each site's job runs in-process, one after another,
    instead of as a Prefect task.
    """
    from fl_components.data.types import DatasetInfo
    from fl_components.federation import central_test_split, dataset_info, materialize_sites
    from fl_components.round.planning import simulate
    from fl_components.site.models import build_model
    from fl_components.site.training import evaluate

    started = time.perf_counter()
    materialize_sites(config)
    info: DatasetInfo = dataset_info(config)
    test = central_test_split(config)
    model = build_model(config.model, info, seed=config.seed)
    accuracy: list[float] = []
    _, round_seconds = simulate(
        config,
        on_round=lambda _, state: accuracy.append(evaluate(model, state.parameters, test).accuracy),
    )
    return {
        "wall_s": time.perf_counter() - started,
        "median_round_s": statistics.median(round_seconds),
        "final_accuracy": accuracy[-1],
    }


def prefect_flow(config: Any) -> dict[str, Any]:
    """The same federation as the Prefect coordinator flow (ephemeral Prefect)."""
    from flows.federated_training import federated_training
    from flows.progress import listening

    marks: dict[str, list[float]] = {"start": [], "round": []}
    started = time.perf_counter()

    def on_event(event: str, payload: dict[str, Any]) -> None:
        if event in marks:
            marks[event].append(time.perf_counter())

    with listening(on_event):
        summary = federated_training(config)
    wall = time.perf_counter() - started
    stamps = marks["start"] + marks["round"]
    rounds = [b - a for a, b in itertools.pairwise(stamps)]
    return {
        "wall_s": wall,
        "prefect_start_s": marks["start"][0] - started,
        "median_round_s": statistics.median(rounds),
        "final_accuracy": summary.final_accuracy,
    }


def centralized(config: Any) -> dict[str, Any]:
    """Same model, pooled training data of all sites, rounds x epochs passes."""
    import numpy as np

    from fl_components.data.site_files import load_site
    from fl_components.data.types import Split
    from fl_components.federation import central_test_split, dataset_info, site_folder
    from fl_components.parameters import get_parameters
    from fl_components.site.models import build_model
    from fl_components.site.training import evaluate, local_train

    info = dataset_info(config)
    parts = [load_site(site_folder(config, n)).train for n in config.site_names]
    pooled = Split(
        np.concatenate([p.features for p in parts]), np.concatenate([p.labels for p in parts])
    )
    model = build_model(config.model, info, seed=config.seed)
    start = get_parameters(model)
    training = config.training.model_copy(update={"epochs": config.rounds * config.training.epochs})
    t0 = time.perf_counter()
    update = local_train(
        model, start, pooled, training, site="central", round_num=1, seed=config.seed
    )
    seconds = time.perf_counter() - t0
    final = [p + d for p, d in zip(start, update.delta, strict=True)]
    return {
        "passes": training.epochs,
        "seconds": seconds,
        "accuracy": evaluate(model, final, central_test_split(config)).accuracy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="fedpipe-bench-"))
    os.environ.setdefault("PREFECT_HOME", str(workdir / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_TASK_RUNS_LEVEL", "WARNING")
    config = _config(workdir, args.rounds)

    loop = bare_loop(config)
    flow = prefect_flow(config)
    central = centralized(config)

    from rich.console import Console
    from rich.table import Table

    console = Console()
    accuracy = Table(title=f"Accuracy on the central test split ({args.rounds} rounds)")
    for column in ("run", "accuracy", "gap to centralized (points)"):
        accuracy.add_column(column)
    accuracy.add_row("centralized, pooled data", f"{central['accuracy']:.4f}", "")
    for name, result in (("federated (Prefect flow)", flow), ("federated (bare loop)", loop)):
        gap = 100 * (central["accuracy"] - result["final_accuracy"])
        accuracy.add_row(name, f"{result['final_accuracy']:.4f}", f"{gap:.2f}")
    console.print(accuracy)

    overhead = Table(title="Orchestration overhead: Prefect flow vs bare loop (same functions)")
    for column in ("runner", "wall s", "Prefect start s", "median round s"):
        overhead.add_column(column)
    overhead.add_row(
        "bare Python loop", f"{loop['wall_s']:.2f}", "", f"{loop['median_round_s']:.3f}"
    )
    overhead.add_row(
        "Prefect flow + MLflow",
        f"{flow['wall_s']:.2f}",
        f"{flow['prefect_start_s']:.2f}",
        f"{flow['median_round_s']:.3f}",
    )
    ratio = flow["median_round_s"] / loop["median_round_s"]
    overhead.add_row(
        "ratio (flow / loop)", f"{flow['wall_s'] / loop['wall_s']:.2f}", "", f"{ratio:.2f}"
    )
    console.print(overhead)

    payload = {
        "title": "Foundation: demo federation accuracy and orchestration overhead",
        "command": "python -m benchmarks.foundation_bench --rounds " + str(args.rounds),
        "machine": {
            "cpu": platform.machine(),
            "cores": os.cpu_count(),
            "python": sys.version.split()[0],
        },
        "date": time.strftime("%Y-%m-%d"),
        "accuracy": {
            "centralized": central["accuracy"],
            "federated_flow": flow["final_accuracy"],
            "federated_loop": loop["final_accuracy"],
            "gap_points": 100 * (central["accuracy"] - flow["final_accuracy"]),
            "centralized_passes": central["passes"],
        },
        "overhead": {
            "loop_wall_s": loop["wall_s"],
            "loop_median_round_s": loop["median_round_s"],
            "flow_wall_s": flow["wall_s"],
            "flow_prefect_start_s": flow["prefect_start_s"],
            "flow_median_round_s": flow["median_round_s"],
            "round_ratio_flow_over_loop": ratio,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
