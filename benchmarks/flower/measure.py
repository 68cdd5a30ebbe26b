"""Run one system as a subprocess: wall time, peak memory of its whole process tree."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class Measured:
    """What one subprocess run cost."""

    wall_s: float
    peak_rss_bytes: int
    returncode: int
    output: str


def tree_rss(root: psutil.Process) -> int:
    """Resident memory of ``root`` and all its descendants (Ray's raylet and workers too)."""
    total = 0
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def measure(
    command: list[str], *, cwd: Path, env: dict[str, str], timeout: float, interval: float = 0.1
) -> Measured:
    """Run ``command``; sample the tree's RSS every ``interval`` s; kill it after ``timeout``."""
    log = cwd / "last-run.log"
    started = time.perf_counter()
    with log.open("w") as sink:
        child = subprocess.Popen(command, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        root = psutil.Process(child.pid)
        peak = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, tree_rss(root))
                done.wait(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            returncode = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for process in [*root.children(recursive=True), root]:
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    continue
            returncode = child.wait()
        wall = time.perf_counter() - started
        done.set()
        sampler.join()
    return Measured(wall, peak, returncode, log.read_text(errors="replace"))
