"""A ~10M-parameter model through each backend, in the clear and under secure aggregation.

    python -m benchmarks.size_backends
    python -m benchmarks.size_backends --hidden 3100 3100 --backends thread dask work-pool

Each case trains 3 sites of scikit-learn's digits with an MLP whose hidden layers give
about 10M parameters, 2 rounds of 1 epoch:

- ``thread`` / ``dask``: ``fedpipe run`` with the local backend and that runner (the sites
  train in the coordinator's process or its Dask workers);
- ``work-pool``: one run from the deployment's Run button on a fresh ``fedpipe up`` stack
  (each site's update crosses the work-pool boundary as a sealed file, named in its sealed
  answer).

Reported: whether the run completed, its wall time, the median round time and final
accuracy from MLflow; for the local backend the peak RSS of the ``fedpipe run`` process
tree's largest process; for the work-pool the peak RSS of the coordinator's flow-run
process and of the largest site process, sampled every 0.5 s from ``/proc`` (``VmHWM``).
The figures go to ``benchmarks/results/size_backends.json`` (``--out`` for another size).

A model above ~60M parameters has a global-model file above the 256 MiB bound on what a
party reads from another: the benchmark raises ``FEDPIPE_MAX_PAYLOAD_BYTES`` to fit, as an
operator would (``fedpipe up`` hands it to every process it starts).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "size_backends.json"
FEDPIPE = [sys.executable, "-m", "ops.cli.main"]
# the child's own peak RSS (and its children's), read after it exits
MEASURED = (
    "import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
    "print('maxrss', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
    "sys.exit(done.returncode)"
)


def _federation(root: Path, hidden: list[int], secure: bool, runner: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": f"size-{runner}-{'secagg' if secure else 'clear'}",
        "rounds": 2,
        "sites": [{"name": f"site-{i}"} for i in range(3)],
        "participation": {"fraction": 1.0, "min_participants": 2},
        "data": {"dataset": "digits", "sites_dir": str(root / "sites")},
        "model": {"kind": "mlp", "hidden": hidden},
        "training": {"epochs": 1, "batch_size": 64, "lr": 0.01},
        "secure_aggregation": {"enabled": secure},
        "tracking": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "register_model": False},
        "seed": 0,
    }
    if runner == "dask":
        config["runner"] = {"kind": "dask", "workers": 2}
    return config


def _params(hidden: list[int]) -> int:
    widths = [64, *hidden, 10]
    return sum(a * b + b for a, b in itertools.pairwise(widths))


def _mlflow_figures(tracking_uri: str, experiment: str) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    (run,) = client.search_runs([found.experiment_id], max_results=1)
    rounds = [m.value for m in client.get_metric_history(run.info.run_id, "round_seconds")]
    return {
        "median_round_s": round(statistics.median(rounds), 2) if rounds else None,
        "final_accuracy": run.data.metrics.get("global/accuracy"),
    }


def local_case(hidden: list[int], secure: bool, runner: str) -> dict[str, Any]:
    """``fedpipe run`` with the local backend and ``runner``, in a fresh folder."""
    root = Path(tempfile.mkdtemp(prefix="fedpipe-size-"))
    config = _federation(root, hidden, secure, runner)
    (root / "fed.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["PREFECT_HOME"] = str(root / "prefect")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", MEASURED, *FEDPIPE, "run", "fed.yaml"],
        cwd=root, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    wall = time.monotonic() - started
    maxrss = [int(x.split()[1]) for x in done.stdout.splitlines() if x.startswith("maxrss ")]
    return {
        "completed": done.returncode == 0,
        "wall_s": round(wall, 1),
        "peak_rss_GB": round(maxrss[-1] * 1024 / 1e9, 2) if maxrss else None,
        **_mlflow_figures(config["tracking"]["tracking_uri"], config["name"]),
        **({} if done.returncode == 0 else {"error": (done.stdout + done.stderr)[-600:]}),
    }


def _peak_kb(pid: int, field: str = "VmHWM") -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    line = next((x for x in status.splitlines() if x.startswith(f"{field}:")), "x: 0 kB")
    return int(line.split()[1])


def _role(pid: int) -> str | None:
    """``site`` (a site's worker, executor or flow run), ``coordinator`` (its flow run)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if any(v.startswith(b"FEDPIPE_SITE_DIR=") for v in environ):
        return "site"
    return "coordinator" if b"prefect.engine" in command else None


class _PeakMemory:
    """The largest VmHWM of the stack's coordinator flow run and site processes, sampled."""

    def __init__(self, state: Path, trace: Path | None = None) -> None:
        self.state = state
        self.trace = trace  # the coordinator's VmRSS over time, one "unix-time kB" line each
        self.peaks: dict[str, int] = {"site": 0, "coordinator": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        from ops.stack.processes import tagged_processes

        lines = []
        while not self._stop.wait(0.5 if self.trace is None else 0.2):
            for pid in tagged_processes(self.state):
                role = _role(pid)
                if role is not None:
                    self.peaks[role] = max(self.peaks[role], _peak_kb(pid))
                if role == "coordinator" and self.trace is not None:
                    lines.append(f"{time.time():.2f} {_peak_kb(pid, 'VmRSS')}\n")
        if self.trace is not None:
            self.trace.write_text("".join(lines))

    def __enter__(self) -> _PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def figures(self) -> dict[str, float]:
        return {
            "coordinator_peak_rss_GB": round(self.peaks["coordinator"] * 1024 / 1e9, 2),
            "site_peak_rss_GB": round(self.peaks["site"] * 1024 / 1e9, 2),
        }


def work_pool_case(hidden: list[int], secure: bool, trace: Path | None = None) -> dict[str, Any]:
    """One Run-button run on a fresh 3-site stack.

    ``trace``: a folder for the coordinator's memory over time (``coordinator_rss.txt``) and
    its flow run's log lines (``coordinator_log.txt``), to see which step holds what.
    """
    from ops.stack.credentials import prefect_auth

    root = Path(tempfile.mkdtemp(prefix="fedpipe-size-stack-"))
    root.chmod(0o711)  # run as root, the stack's PostgreSQL runs as `postgres`
    config = _federation(root, hidden, secure, "work-pool")
    config.pop("tracking")
    (root / "fed.yaml").write_text(yaml.safe_dump(config))
    state = root / "state"
    args = ["--state-dir", str(state), "--mlflow-dir", str(root / "mlflow")]
    args += ["--prefect-port", "0", "--mlflow-port", "0", "--config", str(root / "fed.yaml")]
    up = subprocess.run([*FEDPIPE, "up", *args], capture_output=True, text=True, check=False)
    if up.returncode != 0:
        return {"completed": False, "error": (up.stdout + up.stderr)[-600:]}
    try:
        record = json.loads((state / "stack.json").read_text())
        api, auth = record["prefect_api_url"], prefect_auth(state)
        with httpx.Client(auth=auth, timeout=60) as client:
            deployment = client.get(
                f"{api}/deployments/name/federated-training/federated-training"
            ).json()
            parameters = {"config": {**deployment["parameters"]["config"], "init_from": "fresh"}}
            started = time.monotonic()
            rss_trace = None if trace is None else trace / "coordinator_rss.txt"
            with _PeakMemory(state, rss_trace) as memory:
                run = client.post(
                    f"{api}/deployments/{deployment['id']}/create_flow_run",
                    json={"parameters": parameters},
                ).json()
                while True:
                    run_state = client.get(f"{api}/flow_runs/{run['id']}").json()["state"]
                    if run_state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                        break
                    time.sleep(2)
            wall = time.monotonic() - started
            if trace is not None:
                _write_flow_log(client, api, run["id"], trace / "coordinator_log.txt")
        from ops.stack.credentials import load_credentials

        credentials = load_credentials(state)
        if credentials is not None:
            os.environ["MLFLOW_TRACKING_USERNAME"] = credentials.reader.username
            os.environ["MLFLOW_TRACKING_PASSWORD"] = credentials.reader.password
        figures = _mlflow_figures(record["mlflow_url"], config["name"])
        done = run_state["type"] == "COMPLETED"
        return {
            "completed": done,
            "wall_s": round(wall, 1),
            **figures,
            **memory.figures(),
            **({} if done else {"error": str(run_state.get("message"))[-600:]}),
        }
    finally:
        subprocess.run([*FEDPIPE, "down", "--state-dir", str(state)], capture_output=True)
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(key, None)


def _write_flow_log(client: httpx.Client, api: str, run_id: str, path: Path) -> None:
    """The flow run's log lines, "unix-time message" each, in order."""
    found: list[str] = []
    while True:
        page = client.post(
            f"{api}/logs/filter",
            json={
                "logs": {"flow_run_id": {"any_": [run_id]}},
                "sort": "TIMESTAMP_ASC",
                "offset": len(found),
                "limit": 200,
            },
        ).json()
        found += [
            f"{dt.datetime.fromisoformat(x['timestamp']).timestamp():.2f} {x['message'][:300]}\n"
            for x in page
        ]
        if len(page) < 200:
            break
    path.write_text("".join(found))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[3100, 3100])
    parser.add_argument("--backends", nargs="+", default=["thread", "dask", "work-pool"])
    parser.add_argument("--secure", choices=["both", "clear", "secure"], default="both")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--memory-trace",
        type=Path,
        help="a folder: the work-pool coordinator's RSS over time and its flow run's log",
    )
    options = parser.parse_args()
    parameters = _params(options.hidden)
    # the global model file (4 bytes a value) must fit the bound on what a party reads
    needed = 4 * parameters + 64 * 1024 * 1024
    if needed > 256 * 1024 * 1024:
        os.environ["FEDPIPE_MAX_PAYLOAD_BYTES"] = str(needed)
    modes = {"both": (False, True), "clear": (False,), "secure": (True,)}[options.secure]
    rows = []
    for backend in options.backends:
        for secure in modes:
            print(f"{backend} {'secagg' if secure else 'clear'} ...", flush=True)
            if backend == "work-pool":
                trace = options.memory_trace
                if trace is not None:
                    trace = trace / f"{'secure' if secure else 'clear'}"
                    trace.mkdir(parents=True, exist_ok=True)
                figures = work_pool_case(options.hidden, secure, trace)
            else:
                figures = local_case(options.hidden, secure, backend)
            row = {"backend": backend, "secure_aggregation": secure, **figures}
            print(json.dumps(row), flush=True)
            rows.append(row)
    import prefect
    import torch

    millions = round(parameters / 1e6)
    command = [
        "python -m benchmarks.size_backends --hidden",
        *map(str, options.hidden),
        "--backends",
        *options.backends,
        *(["--secure", options.secure] if options.secure != "both" else []),
        *(["--out", str(options.out)] if options.out != RESULTS else []),
    ]
    options.out.write_text(
        json.dumps(
            {
                "title": f"A {millions}M-parameter model through each backend",
                "command": " ".join(command),
                "machine": {"cpu": platform.machine(), "cores": os.cpu_count()},
                "versions": {
                    "python": sys.version.split()[0],
                    "torch": torch.__version__,
                    "prefect": prefect.__version__,
                },
                "date": dt.date.today().isoformat(),
                "notes": [
                    f"MLP {options.hidden} on digits: {parameters:,} parameters; "
                    "3 sites, 2 rounds, 1 epoch each; on CPU.",
                    "thread / dask: `fedpipe run` (local backend); peak_rss_GB is the largest "
                    "process of its tree (the coordinator, where the thread runner's sites "
                    "train too). work-pool: one run from the Run button on a fresh `fedpipe "
                    "up` stack; each site's update crosses as a sealed file named in its sealed "
                    "answer; coordinator_peak_rss_GB is its flow-run process, site_peak_rss_GB "
                    "the largest site process (VmHWM sampled every 0.5 s).",
                    "final_accuracy: the local backend scores the global model on the central "
                    "test split; the work-pool backend (the coordinator holds no data) on the "
                    "sites' own test splits, hence the different figure for the same training.",
                ],
                "cases": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {options.out}")


if __name__ == "__main__":
    main()
