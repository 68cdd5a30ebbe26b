"""fedpipe side by side with Flower's simulation engine, on the same partition and seeds.

    .venv/bin/python -m benchmarks.flower_bench [--reps 2] [--workloads digits-10,...]
        [--systems flower,flower-central,fedpipe,fedpipe-server,bare,fedpipe-dask]

For every workload (``benchmarks/flower/workloads.py``) fedpipe's partitioner writes the
sites once; then, interleaved repetition by repetition (the order of the systems rotates),
each system runs as a subprocess: Flower's simulation engine (Ray) from its own venv
``build/flower-venv`` (made here on first use: torch==2.13.0 first, then
``flwr[simulation]`` and opacus from PyPI), ``fedpipe run`` (embedded Prefect, MLflow) and
the bare loop over fedpipe's functions. Whole-run wall time (interpreter start to exit),
median round, peak memory of the process tree and final central accuracy go to
``benchmarks/results/flower.json`` with two plots beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from benchmarks.flower.measure import measure
from benchmarks.flower.workloads import WORKLOADS, Workload, prepare
from ops.stack.processes import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FLOWER_VENV = ROOT / "build" / "flower-venv"
WORKDIR = ROOT / "build" / "flower-bench"
SERVER_HOME = WORKDIR / "server-home"  # PREFECT_HOME of system 'fedpipe-server'
# "fedpipe-base": the same CLI from an earlier commit, for before/after (--baseline REV)
BASELINE = ROOT / "build" / "baseline"
ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)")
FINAL = re.compile(r"(?:final global accuracy|accuracy on the central test split)\s+([0-9.]+)")
RAY_START_TIMEOUT = "The current node timed out during startup"
FEDPIPE_MAIN = "from ops.cli.main import main; main()"  # what the `fedpipe` script runs
DEFAULT_WORKLOADS = "digits-10,digits-100,breast_cancer-8,digits-10-dp,breast_cancer-8-dp"


def flower_python() -> Path:
    """The Flower venv's python, creating the venv on first use."""
    python = FLOWER_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(FLOWER_VENV)], check=True)
    check = [str(python), "-c", "import flwr, opacus, ray"]
    if subprocess.run(check, capture_output=True).returncode != 0:
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU wheel on disk, first
        subprocess.run([*pip, "flwr[simulation]", "opacus"], check=True)
    return python


def export_baseline(revision: str) -> None:
    """Check out ``revision``'s tree into build/baseline (for system 'fedpipe-base')."""
    import shutil

    shutil.rmtree(BASELINE, ignore_errors=True)
    BASELINE.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", revision], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(BASELINE)], input=archive, check=True)


def _versions(python: Path) -> dict[str, str]:
    probe = "import flwr, ray, torch, opacus; print(flwr.__version__, ray.__version__)"
    flwr_version, ray_version = subprocess.run(
        [str(python), "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    import opacus
    import prefect
    import torch

    import mlflow

    return {
        "flwr": flwr_version,
        "ray": ray_version,
        "prefect": prefect.__version__,
        "mlflow": mlflow.__version__,
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "python": platform.python_version(),
    }


def _machine() -> dict[str, Any]:
    import psutil

    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
    }


def _command(system: str, workload: Workload, paths: tuple[Path, Path], out: Path) -> list[str]:
    config_path, partition = paths
    if system.startswith("flower"):
        app = [str(flower_python()), str(ROOT / "benchmarks/flower/flower_app.py")]
        return [
            *app,
            str(partition),
            str(out),
            *(["central"] if system.endswith("central") else []),
        ]
    if system.startswith("fedpipe"):
        return [sys.executable, "-c", FEDPIPE_MAIN, "run", str(config_path)]
    return [sys.executable, "-m", "benchmarks.flower.bare_loop", str(config_path), str(out)]


def _variant(system: str, workload: Workload, config_path: Path) -> tuple[Path, Path]:
    """The config and working folder ``system`` runs with.

    'fedpipe' runs cold: a fresh folder each time (no Prefect database, no MLflow store, no
    server running), what a new user's first run meets; the site data stays where it is.
    'fedpipe-dask' is the same run on the Dask runner (a local cluster, 2 workers).
    Every other system runs in WORKDIR with the workload's own config.
    """
    if system not in ("fedpipe", "fedpipe-dask"):
        return config_path, WORKDIR
    folder = WORKDIR / f"{system}-{workload.name}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    raw = yaml.safe_load(config_path.read_text())
    raw["tracking"] = {
        **raw["tracking"],
        "tracking_uri": f"sqlite:///{folder / 'mlflow.db'}",
        "artifact_root": str(folder / "artifacts"),
    }
    if system == "fedpipe-dask":
        raw["runner"] = {"kind": "dask", "workers": 2}
    variant = folder / config_path.name
    variant.write_text(yaml.safe_dump(raw, sort_keys=False))
    return variant, folder


def _parse(system: str, output: str, out: Path) -> dict[str, Any]:
    if not system.startswith("fedpipe"):
        return json.loads(out.read_text()) if out.is_file() else {}
    rounds = [float(m.group(5)) for m in map(ROW.match, output.splitlines()) if m]
    final = FINAL.search(output)
    return {"round_seconds": rounds, "final_accuracy": float(final.group(1)) if final else None}


def run_once(
    system: str, workload: Workload, paths: tuple[Path, Path], *, timeout: float
) -> dict[str, Any]:
    """One subprocess run of ``system`` on ``workload``."""
    out = WORKDIR / f"{workload.name}-{system}.json"
    out.unlink(missing_ok=True)
    code = BASELINE if system == "fedpipe-base" else ROOT
    env = {**os.environ, "PYTHONPATH": str(code), "RAY_DEDUP_LOGS": "0"}
    if system == "fedpipe-server":  # finds the local server (fedpipe server start) there
        env["PREFECT_HOME"] = str(SERVER_HOME)
    retries = 0
    load_before = os.getloadavg()[0]
    while True:
        config_path, cwd = _variant(system, workload, paths[0])
        command = _command(system, workload, (config_path, paths[1]), out)
        measured = measure(command, cwd=cwd, env=env, timeout=timeout)
        # Ray gives its raylet a fixed 30 s to register: on a loaded machine it may not
        if retries < 2 and RAY_START_TIMEOUT in measured.output and measured.returncode != 0:
            retries += 1
            continue
        break
    parsed = _parse(system, measured.output, out)
    rounds = parsed.get("round_seconds") or []
    if measured.returncode != 0:
        print(measured.output[-3000:], file=sys.stderr)
    return {
        "wall_s": measured.wall_s,
        "median_round_s": statistics.median(rounds) if rounds else None,
        "rounds_seen": len(rounds),
        "peak_memory_gb": measured.peak_rss_bytes / 2**30,
        "final_accuracy": parsed.get("final_accuracy"),
        "returncode": measured.returncode,
        "traceback": "Traceback (most recent call last)" in measured.output,
        "retries": retries,
        # the machine's 1-minute load average before and after: other work running beside
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def _span(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    low, high = min(values), max(values)
    return (
        f"{low:.{digits}f}"
        if abs(high - low) < 10 ** (-digits)
        else f"{low:.{digits}f}-{high:.{digits}f}"
    )


def _mean(reps: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in reps if r[key] is not None]
    return statistics.mean(values) if values else float("nan")


def summarize(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """One table row per workload and system: ranges over the repetitions."""
    rows = []
    for name, systems in runs.items():
        for system, reps in systems.items():
            if not reps:
                continue
            rows.append(
                {
                    "workload": name,
                    "system": system,
                    "whole run s": _span([r["wall_s"] for r in reps], 1),
                    "median round s": _span([r["median_round_s"] for r in reps], 3),
                    "peak memory GB": _span([r["peak_memory_gb"] for r in reps], 2),
                    "final accuracy": _span([r["final_accuracy"] for r in reps], 4),
                    "tracebacks": sum(r["traceback"] for r in reps),
                }
            )
    return rows


RATIOS = [
    ("fedpipe cold / flower, whole run", "fedpipe", "flower", "wall_s"),
    ("fedpipe warm / flower, whole run", "fedpipe-server", "flower", "wall_s"),
    ("fedpipe cold / flower-central, whole run", "fedpipe", "flower-central", "wall_s"),
    ("fedpipe warm / flower-central, whole run", "fedpipe-server", "flower-central", "wall_s"),
    ("fedpipe / flower, median round", "fedpipe", "flower", "median_round_s"),
    ("fedpipe cold / bare engine, median round", "fedpipe", "bare", "median_round_s"),
    ("fedpipe warm / bare engine, median round", "fedpipe-server", "bare", "median_round_s"),
    ("fedpipe-dask / flower, whole run", "fedpipe-dask", "flower", "wall_s"),
    ("fedpipe / fedpipe-base, whole run", "fedpipe", "fedpipe-base", "wall_s"),
]


def ratios(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Per workload, the ratios of the systems' means (only where both ran)."""
    rows = []
    for name, systems in runs.items():
        row: dict[str, Any] = {"workload": name}
        for label, top, bottom, key in RATIOS:
            if systems.get(top) and systems.get(bottom):
                row[label] = f"{_mean(systems[top], key) / _mean(systems[bottom], key):.2f}x"
        if len(row) > 1:
            rows.append(row)
    return rows


def plot(
    runs: dict[str, dict[str, list[dict[str, Any]]]], key: str, label: str, path: Path
) -> None:
    """Grouped bars: the mean of ``key`` per workload and system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    systems = sorted({s for v in runs.values() for s in v})
    figure, axis = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(systems))
    for offset, system in enumerate(systems):
        means = [
            statistics.mean(
                [r[key] for r in runs[n].get(system, []) if r[key] is not None] or [0.0]
            )
            for n in names
        ]
        axis.bar([i + offset * width for i in range(len(names))], means, width, label=system)
    axis.set_xticks(
        [i + width * (len(systems) - 1) / 2 for i in range(len(names))], names, rotation=15
    )
    axis.set_ylabel(label)
    axis.legend()
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _reps(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> int:
    return max((len(reps) for systems in runs.values() for reps in systems.values()), default=0)


def resummarize(args: argparse.Namespace) -> None:
    """Tables, ratios and plots again from ``<output>.json``'s runs (same stamp)."""
    old = json.loads((RESULTS / f"{args.output}.json").read_text())
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for run in old["runs"]:
        measured = {k: v for k, v in run.items() if k not in ("workload", "system", "rep")}
        runs.setdefault(run["workload"], {}).setdefault(run["system"], []).append(measured)
    stamp = {key: old[key] for key in ("command", "machine", "date") if key in old}
    write_report(args, runs, old.get("versions", {}), stamp=stamp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2, help="Interleaved repetitions.")
    parser.add_argument("--workloads", default=DEFAULT_WORKLOADS, help=f"Of {sorted(WORKLOADS)}.")
    parser.add_argument("--systems", default="flower,flower-central,fedpipe,fedpipe-server,bare")
    parser.add_argument("--timeout", type=float, default=900, help="Seconds per run.")
    parser.add_argument(
        "--baseline",
        default=None,
        help="Also run system 'fedpipe-base': `fedpipe run` from this git revision.",
    )
    parser.add_argument("--output", default="flower", help="Result name under benchmarks/results.")
    parser.add_argument("--note", action="append", default=[], help="A line for the notes.")
    parser.add_argument(
        "--title",
        default="Side by side with Flower's simulation engine",
        help="The section's title in BENCHMARKS.md.",
    )
    parser.add_argument(
        "--resummarize",
        action="store_true",
        help="Rebuild tables and plots from the existing JSON's runs; measure nothing.",
    )
    args = parser.parse_args()
    if args.resummarize:
        resummarize(args)
        return
    systems = args.systems.split(",")
    if args.baseline:
        export_baseline(args.baseline)
        systems.append("fedpipe-base")
    workloads = [WORKLOADS[name] for name in args.workloads.split(",")]
    WORKDIR.mkdir(parents=True, exist_ok=True)
    versions = _versions(flower_python()) if "flower" in systems else {}
    prepared = {w.name: prepare(w, WORKDIR) for w in workloads}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        w.name: {s: [] for s in systems} for w in workloads
    }
    if "fedpipe-server" in systems:  # started once, before the runs, and not timed
        _local_server("start", "--port", str(free_port()))
    try:
        _interleave(args, systems, workloads, prepared, runs, versions)
    finally:
        if "fedpipe-server" in systems:
            _local_server("stop")


def _local_server(*args: str) -> None:
    """``fedpipe server ...`` under SERVER_HOME (system 'fedpipe-server' runs against it)."""
    SERVER_HOME.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(SERVER_HOME), "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-c", FEDPIPE_MAIN, "server", *args]
    subprocess.run(command, cwd=WORKDIR, env=env, check=True, timeout=600)


def _interleave(
    args: argparse.Namespace,
    systems: list[str],
    workloads: list[Workload],
    prepared: dict[str, tuple[Path, Path]],
    runs: dict[str, dict[str, list[dict[str, Any]]]],
    versions: dict[str, str],
) -> None:
    """The repetitions, the order of the systems rotating each repetition."""
    for rep in range(args.reps):
        for workload in workloads:
            order = systems[rep % len(systems) :] + systems[: rep % len(systems)]
            for system in order:
                result = run_once(system, workload, prepared[workload.name], timeout=args.timeout)
                runs[workload.name][system].append(result)
                print(
                    f"rep {rep} {workload.name:<20} {system:<8} " + json.dumps(result), flush=True
                )
                write_report(args, runs, versions)  # after every run: a cut-short run still counts


def write_report(
    args: argparse.Namespace,
    runs: dict[str, dict[str, list[dict[str, Any]]]],
    versions: dict[str, str],
    *,
    stamp: dict[str, Any] | None = None,
) -> None:
    """Write benchmarks/results/<output>.json and its plots from the runs so far."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    plots = {
        "wall": f"{args.output}_wall.png",
        "round": f"{args.output}_round.png",
        "memory": f"{args.output}_memory.png",
    }
    plot(runs, "wall_s", "whole run, s", RESULTS / plots["wall"])
    plot(runs, "median_round_s", "median round, s", RESULTS / plots["round"])
    plot(runs, "peak_memory_gb", "peak memory of the process tree, GB", RESULTS / plots["memory"])
    command = "python -m benchmarks.flower_bench " + " ".join(sys.argv[1:])
    report = {
        "title": args.title,
        "command": command.strip(),
        "machine": _machine(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": versions,
        **(stamp or {}),  # --resummarize keeps the measuring run's command, machine, date
        "notes": [
            "Same partition (fedpipe's Dirichlet(0.5) split, seed 0), same θ_0, same model and "
            "optimizer (SGD 0.05, momentum 0.9, batch 32, 1 local epoch), every site trains and "
            "evaluates every round; DP: Opacus DP-SGD, sigma 1.0, C 1.0, Poisson sampling.",
            "Wall: subprocess start to exit, imports included. Round: the median of the "
            "run's rounds (fedpipe: its round_seconds; Flower: between its server-side "
            "evaluations; bare: train + evaluate). Peak memory: RSS summed over the process "
            "tree (Ray's raylet, GCS and workers; Prefect's server), sampled every 0.1 s.",
            f"Repetitions interleaved ({_reps(runs)}); ranges are min-max over them.",
            "fedpipe-base: the same `fedpipe run` from the --baseline revision (before/after "
            "in the same interleaved run).",
            "fedpipe (cold): `fedpipe run` in a fresh folder each time: no Prefect database, "
            "no MLflow store, no server running (Prefect's empty schema made once at install "
            "by `make`: `fedpipe server prepare`). flower: Flower evaluates on every site "
            "every round, as fedpipe does; flower-central: Flower evaluates centrally only. "
            "fedpipe-dask: the cold run on the Dask runner (local cluster, 2 workers).",
            "fedpipe-server: the same `fedpipe run` against a local Prefect server started "
            "once before the runs (`fedpipe server start`, as a user keeps one for the UI): "
            "its start is not timed and its memory (~0.3 GB) is not in the run's tree.",
            *args.note,
        ],
        "plots": list(plots.values()),
        "summary": summarize(runs),
        "ratios": ratios(runs),
        "runs": [
            {"workload": n, "system": s, "rep": i, **r}
            for n, v in runs.items()
            for s, reps in v.items()
            for i, r in enumerate(reps)
        ],
    }
    (RESULTS / f"{args.output}.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {RESULTS / (args.output + '.json')}")


if __name__ == "__main__":
    main()
