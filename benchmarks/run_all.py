"""Run every benchmark in turn, then regenerate BENCHMARKS.md (``make bench``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = [
    ["-m", "benchmarks.foundation_bench"],
    ["benchmarks/privacy_bench.py"],
    ["benchmarks/secagg_bench.py"],
    ["benchmarks/dispatch_bench.py"],
    ["-m", "benchmarks.strategies_bench", "--rounds", "40", "--seeds", "3"],
    ["-m", "benchmarks.robustness_bench", "--rounds", "20", "--seeds", "2"],
    ["benchmarks/communication_bench.py"],
]


def main() -> None:
    for args in BENCHMARKS:
        if not args[0].startswith("-") and not (ROOT / args[0]).is_file():
            print(f"skipping {args[0]}: not present")
            continue
        print(f"== {' '.join(args)}", flush=True)
        subprocess.run([sys.executable, *args], cwd=ROOT, check=True)
    subprocess.run([sys.executable, "-m", "benchmarks.report"], cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
