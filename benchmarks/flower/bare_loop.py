"""The workload as a bare Python loop over fedpipe's round engine (no Prefect, no MLflow).

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
    """Train the federation in config_path; round times and the final central accuracy.

    The very round engine the flow runs (``fl_components.engine.run_round``: same strategy,
    selection, seeds and folded evaluation); its dispatch runs each site's job in-process,
    one after another, instead of as Prefect tasks.
    """
    from fl_components.config import load_config
    from fl_components.engine import EvaluationRequest, RoundPlan, evaluate_sites, run_round
    from fl_components.federation import central_test_split, select_participants
    from fl_components.models import build_model
    from fl_components.parameters import get_parameters
    from fl_components.participant import InProcessSites
    from fl_components.strategies import build_strategy
    from fl_components.training import evaluate, seed_for

    config = load_config(config_path)
    sites = InProcessSites(config)
    test = central_test_split(config)
    if test is None:
        raise RuntimeError(f"{config_path}: the bare loop needs a bundled data set")
    model = build_model(config.model, sites.info, seed=config.seed)
    strategy = build_strategy(
        config.strategy, num_sites=len(config.sites), local_lr=config.training.lr
    )
    state = strategy.initial_state(get_parameters(model))
    index = {name: i for i, name in enumerate(config.site_names)}
    evaluation = EvaluationRequest(round=0, sites=config.site_names)
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
        plan = RoundPlan(
            round=round_num,
            selected=selected,
            seeds={
                s: seed_for(base=config.seed, round_num=round_num, site_index=index[s])
                for s in selected
            },
            min_participants=config.participation.min_participants,
            evaluation=evaluation,
        )
        state, _ = run_round(state, plan, sites, strategy)
        evaluation = EvaluationRequest(round=round_num, sites=config.site_names)
        accuracy = evaluate(model, state.parameters, test).accuracy
        round_seconds.append(time.perf_counter() - started)
    evaluate_sites(state.parameters, evaluation, sites)  # the last round's federated score
    return {"round_seconds": round_seconds, "final_accuracy": accuracy}


if __name__ == "__main__":
    Path(sys.argv[2]).write_text(json.dumps(run(Path(sys.argv[1]))))
