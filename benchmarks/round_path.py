"""Which of fedpipe's files one federated round runs through, measured, not guessed.

Runs a federation in-process with a profile hook on every thread and records each
first-party file whose code is called between the end of round 1 and the end of round 2:
exactly one round (plan, dispatch, the sites' work, aggregation, the update, logging). The
run's own start and end (servers, model registration) fall outside that window.

    python -m benchmarks.round_path examples/hospitals-breast-cancer.yaml
    python -m benchmarks.round_path examples/bank-branches-secagg.yaml --json out.json

Prints the files with their line counts and writes JSON when asked.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ops", "flows", "tasks", "fl_components")


def measure(config_path: Path) -> list[str]:
    """The first-party files one round (round 2 of 3) calls into, sorted."""
    from fl_components.config import load_config
    from flows.federated_training import federated_training
    from flows.progress import listening
    from ops.servers.temporary import TemporaryServer

    seen: set[str] = set()
    window = {"open": False}

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and window["open"]:
            seen.add(frame.f_code.co_filename)

    def listener(event: str, payload: dict[str, Any]) -> None:
        if event == "round":
            window["open"] = payload["round"] == 1

    config = load_config(config_path).model_copy(update={"rounds": 3})
    server = TemporaryServer.start(Path(tempfile.mkdtemp()) / "server.log")
    try:
        server.wait_ready(timeout=180)
        with server.serving(), listening(listener):
            threading.setprofile(profile)
            sys.setprofile(profile)
            try:
                federated_training(config)
            finally:
                sys.setprofile(None)
                threading.setprofile(None)  # type: ignore[arg-type]
    finally:
        server.stop()
    files = set()
    for name in seen:
        path = Path(name)
        if path.is_relative_to(ROOT) and path.relative_to(ROOT).parts[0] in PACKAGES:
            files.add(str(path.relative_to(ROOT)))
    return sorted(files)


def main() -> None:
    """Print the round's files; ``--json`` also writes them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    files = measure(args.config)
    lines = {f: len((ROOT / f).read_text().splitlines()) for f in files}
    for f in files:
        print(f"{lines[f]:6d}  {f}")
    print(f"{len(files)} files, {sum(lines.values())} lines")
    if args.json:
        args.json.write_text(json.dumps({"config": str(args.config), "files": lines}, indent=1))


if __name__ == "__main__":
    main()
