"""Dispatch overhead per round: work-pool backend against local backend, same federation.

Starts a private stack (`ops.stack.lifecycle.up`, free ports, temp folder) with N sites, runs the
same federation with both backends (the coordinator in this process, against the stack's
Prefect server), and reports per-round seconds; the difference is what dispatching to the
sites' work pools costs (worker polling, a flow-run subprocess per site and stage, result
storage). A round is one dispatch: each site trains and, in the same flow run, scores the
model it received (the previous round's federated evaluation); the last round adds one
evaluation dispatch of its own, so the median of 3+ rounds is the per-round figure.

    .venv/bin/python -m benchmarks.dispatch_bench --sites 5 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

RESULTS = Path(__file__).resolve().parent / "results" / "dispatch.json"


def _federation(root: Path, sites: int, rounds: int) -> Path:
    config = {
        "name": "dispatch-bench",
        "rounds": rounds,
        "sites": [{"name": f"site-{i}"} for i in range(sites)],
        "participation": {"fraction": 1.0, "min_participants": 2},
        "data": {"dataset": "digits", "sites_dir": str(root / "sites")},
        "model": {"kind": "mlp", "hidden": [32]},
        "training": {"epochs": 1, "batch_size": 32},
        "tracking": {"register_model": False},
        "deployment": {"poll_interval": 0.2},
        "seed": 0,
    }
    path = root / "federation.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _single_dispatch_seconds(config: Any, *, repeats: int) -> list[float]:
    """Dispatch-to-result time of one site's stage when nothing else competes for the CPU.

    On one host that simulates N sites, N flow-run subprocesses share its cores; on a real
    deployment each site's worker has its own host, so this is the per-round floor there.
    """
    from fl_components.exchange import write_global_model
    from fl_components.federation import dataset_info
    from fl_components.parameters import get_parameters
    from fl_components.site.models import build_model
    from fl_components.site.policy import installed_task_code
    from fl_components.wire.signing import CoordinatorIdentity, coordinator_keys_dir, sign
    from fl_components.wire.site_job import ModelRef, SiteJobMessage
    from tasks.work_pool import run_participant

    # the stack's coordinator key (fedpipe up made it): each dispatch is a signed job
    identity = CoordinatorIdentity.load(coordinator_keys_dir(config.deployment.exchange_dir))

    model = build_model(config.model, dataset_info(config), seed=0)
    root = Path(config.deployment.exchange_dir).resolve() / "single-dispatch"
    uri, sha = write_global_model(get_parameters(model), root)
    seconds = []
    for attempt in range(repeats):
        t0 = time.perf_counter()
        message = SiteJobMessage(
            federation=config,
            site=config.site_names[0],
            round=1 + attempt,  # within the site policy's rounds.max_per_run
            stage="evaluate",
            model=ModelRef(uri=uri, sha256=sha),
            run_id="single-dispatch",
            task_code=installed_task_code(),
        )
        run_participant.fn(
            sign(message, identity=identity, audience=message.site, lifetime=timedelta(hours=1))
        )
        seconds.append(time.perf_counter() - t0)
    return seconds


def _cpu_seconds(root: Path) -> float:
    """CPU seconds used so far by this process and every process of the stack under ``root``.

    Includes reaped children (cutime/cstime): the flow runs forked by the warm executors.
    """
    from ops.stack.lifecycle import tagged_processes

    tick = os.sysconf("SC_CLK_TCK")
    total = sum(os.times()[:4])
    for pid in tagged_processes(root):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += sum(int(f) for f in fields[11:15]) / tick  # utime stime cutime cstime
    return total


class _DispatchTimings(logging.Handler):
    """Collects the participant tasks' "created in Xs, result in Ys" lines, per backend run."""

    PATTERN = re.compile(r"created in ([0-9.]+)s, result in ([0-9.]+)s")

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.rows: list[tuple[float, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = self.PATTERN.search(record.getMessage())
        if found:
            self.rows.append((float(found.group(1)), float(found.group(2))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--database",
        choices=("sqlite", "postgres", "both"),
        default="sqlite",
        help="the Prefect server's database (postgres: a throwaway local cluster)",
    )
    args = parser.parse_args()
    results = {}
    for database in ("sqlite", "postgres") if args.database == "both" else (args.database,):
        if database == "postgres":
            from benchmarks.postgres import throwaway_postgres

            with throwaway_postgres() as url:
                results[database] = _measure(args, database_url=url)
        else:
            results[database] = _measure(args, database_url=None)
    result = {
        "command": "python -m benchmarks.dispatch_bench " + " ".join(sys.argv[1:]),
        **(results.get("sqlite") or results["postgres"]),
    }
    if len(results) > 1:
        result["postgres"] = results["postgres"]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {RESULTS}")


def _measure(args: argparse.Namespace, *, database_url: str | None) -> dict[str, Any]:
    """Start a stack on the given database, run both backends, stop it; report and return."""
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_TASK_RUNS_LEVEL", "WARNING")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from fl_components.config import FederationConfig
    from flows.federated_training import federated_training
    from ops.stack import lifecycle as stack

    timings = _DispatchTimings()
    logging.getLogger("prefect.task_runs").addHandler(timings)
    root = Path(tempfile.mkdtemp(prefix="fedpipe-dispatch-"))
    started = time.perf_counter()
    record = stack.up(
        config_path=_federation(root, args.sites, args.rounds),
        root=root / "state",
        mlflow_dir=root / "mlflow",
        prefect_port=0,
        mlflow_port=0,
        database_url=database_url,
    )
    up_seconds = time.perf_counter() - started
    rows: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    try:
        deployed = FederationConfig.model_validate_json(
            (root / "state" / "federation.json").read_text()
        )
        with temporary_settings(updates={PREFECT_API_URL: record["prefect_api_url"]}):
            for backend in ("local", "work-pool"):
                config = FederationConfig.model_validate(
                    {**deployed.model_dump(mode="json"), "backend": backend}
                )
                t0 = time.perf_counter()
                cpu0 = _cpu_seconds(root / "state")
                summary = federated_training(config)
                cpu = _cpu_seconds(root / "state") - cpu0
                seconds = [row["round_seconds"] for row in summary.history]
                if backend == "work-pool" and timings.rows:
                    creates = [c for c, _ in timings.rows]
                    results = [r for _, r in timings.rows]
                    stats = {
                        "dispatches": len(timings.rows),
                        "median_create_seconds": statistics.median(creates),
                        "median_result_seconds": statistics.median(results),
                        "max_result_seconds": max(results),
                    }
                rows[backend] = {
                    "round_seconds": seconds,
                    "median_round_seconds": statistics.median(seconds),
                    "run_seconds": time.perf_counter() - t0,
                    "final_accuracy": summary.final_accuracy,
                    # all processes together; 2 cores give at most 2 CPU-seconds a second
                    "cpu_seconds": cpu,
                    "cpu_busy_fraction": cpu / (os.cpu_count() or 1) / (time.perf_counter() - t0),
                }
            single = _single_dispatch_seconds(deployed, repeats=3)
    finally:
        logging.getLogger("prefect.task_runs").removeHandler(timings)
        stack.down(root=root / "state")
    overhead = rows["work-pool"]["median_round_seconds"] - rows["local"]["median_round_seconds"]
    result = {
        "benchmark": "dispatch",
        "sites": args.sites,
        "rounds": args.rounds,
        "stack_up_seconds": up_seconds,
        "backends": rows,
        "dispatch_overhead_per_round_seconds": overhead,
        "dispatches_per_round": 1,  # + one final evaluation per run (folded evaluation)
        "participant_tasks": stats,
        "single_site_dispatch_seconds": single,
        "single_site_dispatch_median_seconds": statistics.median(single),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load": os.getloadavg(),
        },
        "settings": {
            "PREFECT_WORKER_QUERY_SECONDS": 1,
            "poll_interval": 0.2,
            "database": "postgres" if database_url else "sqlite",
        },
    }
    print(
        f"[{result['settings']['database']}] dispatch overhead, {args.sites} sites x {args.rounds} rounds (stack up {up_seconds:.1f}s)"
    )
    print(f"{'backend':<10} {'median round s':>15} {'rounds (s)':>30} {'accuracy':>9}")
    for backend, row in rows.items():
        per_round = " ".join(f"{s:.2f}" for s in row["round_seconds"])
        print(
            f"{backend:<10} {row['median_round_seconds']:>15.2f} {per_round:>30} "
            f"{row['final_accuracy']:>9.4f}"
        )
    print(f"overhead per round (1 dispatch): {overhead:.2f}s")
    for backend, row in rows.items():
        print(
            f"{backend}: {row['cpu_seconds']:.1f} CPU-s over the run, all processes; the "
            f"{os.cpu_count()} cores {100 * row['cpu_busy_fraction']:.0f}% busy"
        )
    if stats:
        print(
            f"participant tasks ({stats['dispatches']}): median creation "
            f"{stats['median_create_seconds']:.2f}s, median dispatch-to-result "
            f"{stats['median_result_seconds']:.2f}s (max {stats['max_result_seconds']:.2f}s)"
        )
    print(
        "one site's evaluate stage alone, nothing else running (dispatch to result): "
        + " ".join(f"{s:.2f}" for s in single)
        + f" s (median {statistics.median(single):.2f})"
    )
    return result


if __name__ == "__main__":
    main()
