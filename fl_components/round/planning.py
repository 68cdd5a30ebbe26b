"""A federation run as a plain loop over the round engine: no Prefect, no MLflow.

The benchmarks' bare loop. It plans each round as the coordinator flow does (the same
selection, seeds and folded evaluation: :func:`plain_plan`), runs the very same
:func:`fl_components.round.engine.run_round`, and runs each site's job in this process, one after
another (:class:`fl_components.site.jobs.InProcessSites`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fl_components.config import FederationConfig
from fl_components.federation import materialize_sites, round_target, select_participants
from fl_components.parameters import get_parameters
from fl_components.round.engine import EvaluationRequest, RoundPlan, evaluate_sites, run_round
from fl_components.site.jobs import InProcessSites
from fl_components.site.training import seed_for, share_cores
from fl_components.strategies import ServerState, Strategy, build_strategy
from fl_components.task.loading import resolve_task


def draw_selection(config: FederationConfig, *, round_num: int) -> tuple[str, ...]:
    """Round ``round_num``'s sites, drawn as ``config.participation`` says.

    Under participant-level DP with random sampling the draw is secret (the OS's CSPRNG):
    client-sampling amplification holds only if nobody can replay the selection.
    """
    privacy = config.privacy
    return select_participants(
        config.site_names,
        fraction=config.participation.fraction,
        minimum=config.participation.min_participants,
        round_num=round_num,
        seed=config.seed,
        secret=privacy.participant_level and privacy.sampling == "random",
        extra=config.participation.over_select,
    )


def plain_plan(
    config: FederationConfig,
    *,
    round_num: int,
    selected: tuple[str, ...],
    evaluation: EvaluationRequest | None,
) -> RoundPlan:
    """The plan of a round in the clear: seeds, quorum, folded evaluation, update bound."""
    index = {name: i for i, name in enumerate(config.site_names)}
    bound = config.strategy.norm_bound
    return RoundPlan(
        round=round_num,
        selected=selected,
        seeds={
            s: seed_for(base=config.seed, round_num=round_num, site_index=index[s])
            for s in selected
        },
        min_participants=config.participation.min_participants,
        evaluation=evaluation,
        # an update 100x past the norm bound is not an honest one to clip: refuse it outright
        max_update_norm=None if bound is None else 100.0 * bound,
        target=round_target(
            len(config.sites),
            fraction=config.participation.fraction,
            minimum=config.participation.min_participants,
        )
        if config.participation.over_select
        else None,
    )


def strategy_for(config: FederationConfig) -> Strategy:
    """The config's strategy, with what SCAFFOLD (N) and q-FedAvg (the local lr) need."""
    return build_strategy(config.strategy, num_sites=len(config.sites), local_lr=config.training.lr)


def simulate(
    config: FederationConfig,
    *,
    on_round: Callable[[int, ServerState], None] | None = None,
) -> tuple[ServerState, list[float]]:
    """Run ``config.rounds`` rounds in the clear; the final state and each round's seconds.

    ``on_round(round, state)`` is called after each round (outside the timed part is the
    caller's business: its time counts in that round's seconds).
    """
    if config.data.source == "bundled":  # site files: the sites' own folders, as they are
        materialize_sites(config)
    share_cores(config.training, sites=len(config.sites))  # as the flow's simulated sites
    sites = InProcessSites(config)
    strategy = strategy_for(config)
    model = resolve_task(config, sites.info).build_model(config.seed)
    state = strategy.initial_state(get_parameters(model))
    evaluation = EvaluationRequest(round=0, sites=config.site_names)
    seconds: list[float] = []
    for round_num in range(1, config.rounds + 1):
        started = time.perf_counter()
        selected = draw_selection(config, round_num=round_num)
        plan = plain_plan(config, round_num=round_num, selected=selected, evaluation=evaluation)
        state, _ = run_round(state, plan, sites, strategy)
        evaluation = EvaluationRequest(round=round_num, sites=config.site_names)
        if on_round is not None:
            on_round(round_num, state)
        seconds.append(time.perf_counter() - started)
    evaluate_sites(state.parameters, evaluation, sites)  # the last round's federated score
    return state, seconds
