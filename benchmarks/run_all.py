"""Run the benchmarks in turn, then regenerate BENCHMARKS.md.

    .venv/bin/python -m benchmarks.run_all          # make bench: what fits in ~15 minutes
    .venv/bin/python -m benchmarks.run_all --full   # make bench-full: every workload

``make bench`` runs the side-by-side with Flower on the two small workloads (one
repetition), the communication benchmark and one seed of the strategies and robustness
benchmarks; ``--full`` adds 100 participants, DP, two repetitions, the profile, every seed
and the other benchmarks (privacy, secure aggregation, dispatch).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMUNICATION = ["benchmarks/communication_bench.py"]
VARIED = "qsgd-4bit,random-25%+ef/4bit"  # rerun over more seeds: the accuracy claim rests on them
QUICK = [
    ["-m", "benchmarks.flower_bench", "--reps", "1", "--workloads", "digits-10,breast_cancer-8"],
    [*COMMUNICATION, "--rounds", "20"],
    ["-m", "benchmarks.strategies_bench", "--rounds", "20", "--seeds", "1"],
    ["-m", "benchmarks.robustness_bench", "--rounds", "20", "--seeds", "1"],
]
FULL = [
    ["-m", "benchmarks.flower_bench", "--reps", "2"],
    ["-m", "benchmarks.profile_run", "--workloads", "digits-10,digits-100"],
    ["-m", "benchmarks.scaling_bench", "--rounds", "2"],
    ["-m", "benchmarks.foundation_bench"],
    ["benchmarks/privacy_bench.py"],
    ["benchmarks/secagg_bench.py"],
    ["benchmarks/dispatch_bench.py"],
    ["-m", "benchmarks.gpu_bench"],
    ["-m", "benchmarks.strategies_bench", "--rounds", "40", "--seeds", "3"],
    ["-m", "benchmarks.robustness_bench", "--rounds", "20", "--seeds", "2"],
    ["benchmarks/communication_bench.py"],
    [*COMMUNICATION, "--dataset", "synthetic", "--output", "communication_synthetic"],
    [*COMMUNICATION, "--seed", "1", "--output", "communication_seed1", "--variants", VARIED],
    [*COMMUNICATION, "--seed", "2", "--output", "communication_seed2", "--variants", VARIED],
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="Every benchmark, every workload.")
    args = parser.parse_args()
    for bench in FULL if args.full else QUICK:
        if not bench[0].startswith("-") and not (ROOT / bench[0]).is_file():
            print(f"skipping {bench[0]}: not present")
            continue
        print(f"== {' '.join(bench)}", flush=True)
        subprocess.run([sys.executable, *bench], cwd=ROOT, check=True)
    subprocess.run([sys.executable, "-m", "benchmarks.report"], cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
