"""The workload as a bare Python loop over fedpipe's own functions (no Prefect, no MLflow).

The floor the orchestrated run is measured against: the same sites, model, seeds and
evaluation per round, nothing else.

    .venv/bin/python -m benchmarks.flower.bare_loop CONFIG.yaml OUT.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def run(config_path: Path) -> dict[str, object]:
    """Train the federation in config_path; round times and the final central accuracy."""
    from fl_components.config import load_config
    from fl_components.federation import (
        Site,
        central_test_split,
        dataset_info,
        select_participants,
        site_folder,
    )
    from fl_components.models import build_model
    from fl_components.parameters import get_parameters
    from fl_components.strategies import ServerState, build_strategy, weighted_average
    from fl_components.training import evaluate, seed_for

    config = load_config(config_path)
    info = dataset_info(config)
    test = central_test_split(config)
    if test is None:
        raise RuntimeError(f"{config_path}: the bare loop needs a bundled data set")
    model = build_model(config.model, info, seed=config.seed)
    state = ServerState(round=0, parameters=get_parameters(model))
    strategy = build_strategy(config.strategy)
    sites = [
        Site(name=name, folder=site_folder(config, name), config=config, info=info)
        for name in config.site_names
    ]
    round_seconds, accuracy = [], float("nan")
    for round_num in range(1, config.rounds + 1):
        started = time.perf_counter()
        selected = select_participants(
            config.site_names,
            fraction=config.participation.fraction,
            minimum=config.participation.min_participants,
            round_num=round_num,
            seed=config.seed,
        )
        chosen = set(selected)
        updates = [
            site.train(
                state.parameters,
                round_num=round_num,
                seed=seed_for(base=config.seed, round_num=round_num, site_index=index),
            )
            for index, site in enumerate(sites)
            if site.name in chosen
        ]
        state = strategy.apply(
            state, weighted_average([(u.delta, u.num_examples) for u in updates])
        )
        for site in sites:
            site.evaluate(state.parameters)
        accuracy = evaluate(model, state.parameters, test).accuracy
        round_seconds.append(time.perf_counter() - started)
    return {"round_seconds": round_seconds, "final_accuracy": accuracy}


if __name__ == "__main__":
    Path(sys.argv[2]).write_text(json.dumps(run(Path(sys.argv[1]))))
