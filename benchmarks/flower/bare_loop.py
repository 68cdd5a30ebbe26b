"""The workload as a bare Python loop over fedpipe's round engine (no Prefect, no MLflow).

The floor the orchestrated run is measured against: the same sites, model, seeds and
evaluation per round, nothing else.

    .venv/bin/python -m benchmarks.flower.bare_loop CONFIG.yaml OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def run(config_path: Path) -> dict[str, object]:
    """Train the federation in config_path; round times and the final central accuracy.

    The very round engine the flow runs (``fl_components.round.engine.run_round``: same strategy,
    selection, seeds and folded evaluation); its dispatch runs each site's job in-process,
    one after another, instead of as Prefect tasks.
    """
    from fl_components.config import load_config
    from fl_components.federation import central_test_split, dataset_info, materialize_sites
    from fl_components.round.planning import simulate
    from fl_components.site.models import build_model
    from fl_components.site.training import evaluate

    config = load_config(config_path)
    materialize_sites(config)
    test = central_test_split(config)
    if test is None:
        raise RuntimeError(f"{config_path}: the bare loop needs a bundled data set")
    model = build_model(config.model, dataset_info(config), seed=config.seed)
    accuracy: list[float] = []
    _, round_seconds = simulate(
        config,
        on_round=lambda _, state: accuracy.append(evaluate(model, state.parameters, test).accuracy),
    )
    return {"round_seconds": round_seconds, "final_accuracy": accuracy[-1]}


if __name__ == "__main__":
    Path(sys.argv[2]).write_text(json.dumps(run(Path(sys.argv[1]))))
