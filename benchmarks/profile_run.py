"""Where the seconds of an embedded ``fedpipe run`` go, from py-spy and the CLI's own clock.

    .venv/bin/python -m benchmarks.profile_run [--workloads digits-10,digits-100]

Needs ``py-spy`` (``pip install py-spy``; a profiling tool, not a fedpipe dependency). Each
workload (``benchmarks/flower/workloads.py``) runs once under ``py-spy record
--subprocesses`` (the temporary Prefect server's process included) at 50 Hz. Two views go to
``benchmarks/results/profile.json``:

- wall: the phases the CLI prints (start until "Prefect up", the rounds, the end after the
  last round) and the whole run;
- CPU: py-spy's on-CPU samples per process and per category (a stack counts for the first
  category, in :data:`CATEGORIES` order, that one of its frames matches).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from benchmarks.flower.workloads import WORKLOADS, prepare
from benchmarks.flower_bench import FEDPIPE_MAIN, RESULTS, ROOT, ROW, _machine
from benchmarks.flower_bench import WORKDIR as BENCH_DIR

WORKDIR = BENCH_DIR / "profile"  # its own sites: never rewrite a running benchmark's

RATE = 50
UP = re.compile(r"Prefect up after ([0-9.]+)s")
# (category, a regex one of the stack's frames must match); first match wins
CATEGORIES = [
    (
        "end of run: drain events, wait for the server to record",
        r"_wait_task_runs_recorded|drain_all",
    ),
    ("waiting for the temporary server to start", r"SubprocessASGIServer|wait_ready"),
    ("imports", r"_find_and_load"),
    ("local training (torch)", r"train_epochs|dp_train"),
    ("evaluation (torch)", r"\bevaluate \(fl_components|evaluate_site|evaluate_global"),
    ("MLflow writes", r"\(mlflow/|mlflow\.|tracking\.py"),
    ("Prefect artifacts, events, logs", r"prefect/(events|logging|artifacts)"),
    ("Prefect task engine and states", r"prefect/(task_engine|task_runners|futures|states|client)"),
    ("Prefect flow engine", r"prefect/(?!server)"),
    ("site data loading", r"load_site|read_split|np\.load|numpy/lib"),
    ("server: start-up (imports, create_app)", r"click/core|create_app|<module> \(prefect"),
    (
        "server: recording events and task runs (SQLite)",
        r"messaging|task_run_recorder|aiosqlite|sqlalchemy",
    ),
    ("server: API requests", r"prefect/server/api|starlette|fastapi"),
]


# py-spy --subprocesses opens each stack with its process chain: process PID:"CMDLINE";...
PROCESSES = re.compile(r'^((?:process \d+:"[^"]*";?)+)')


def _process(chain: str) -> str:
    own = chain.rstrip(";").rsplit("process ", 1)[-1]
    if "uvicorn" in own or "prefect.server" in own:
        return "temporary Prefect server (subprocess)"
    return "fedpipe run (main process)"


def categorize(raw: str) -> dict[str, dict[str, float]]:
    """Seconds of on-CPU samples per process, then per category (py-spy's raw format)."""
    per_process: dict[str, Counter[str]] = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        chain = PROCESSES.match(stack)
        if not stack or not count.isdigit() or chain is None:
            continue
        process = _process(chain.group(1))
        stack = stack[chain.end() :]
        category = next((name for name, rx in CATEGORIES if re.search(rx, stack)), "other")
        per_process.setdefault(process, Counter())[category] += int(count)
    return {
        process: {k: round(v / RATE, 1) for k, v in counts.most_common()}
        for process, counts in per_process.items()
    }


def profile(name: str) -> dict[str, object]:
    """Run one workload under py-spy; the wall phases and the CPU categories."""
    config_path, _ = prepare(WORKLOADS[name], WORKDIR)
    out = WORKDIR / f"profile-{name}.txt"
    command = [
        shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"),
        *("record", "-r", str(RATE), "--subprocesses", "--nonblocking", "-f", "raw"),
        *("-o", str(out), "--", sys.executable, "-c", FEDPIPE_MAIN, "run", str(config_path)),
    ]
    started = time.perf_counter()
    # py-spy slows the server's start several-fold on a loaded machine: give it time
    env = {"PYTHONPATH": str(ROOT), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600"}
    result = subprocess.run(
        command, cwd=WORKDIR, env={**_environ(), **env}, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    output = result.stdout + result.stderr
    (WORKDIR / f"profile-{name}.log").write_text(output)
    up = UP.search(output)
    rounds = [float(m.group(5)) for m in map(ROW.match, output.splitlines()) if m]
    start = float(up.group(1)) if up else float("nan")
    return {
        "wall": {
            "whole_run_s": round(wall, 1),
            "start_until_prefect_up_s": start,
            "rounds_s": round(sum(rounds), 1),
            "median_round_s": sorted(rounds)[len(rounds) // 2] if rounds else None,
            "after_last_round_s": round(wall - start - sum(rounds), 1),
            "traceback_at_end": "Traceback (most recent call last)" in output,
        },
        "cpu_seconds": categorize(out.read_text()) if out.is_file() else {},
    }


def _environ() -> dict[str, str]:
    import os

    return dict(os.environ)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="digits-10,digits-100")
    parser.add_argument("--output", default="profile")
    args = parser.parse_args()
    WORKDIR.mkdir(parents=True, exist_ok=True)
    report = {
        "title": "Profile of the embedded run (py-spy)",
        "command": "python -m benchmarks.profile_run " + " ".join(sys.argv[1:]),
        "machine": _machine(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        **{name: profile(name) for name in args.workloads.split(",")},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.output}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
