"""Prefect tasks wrapping the core's training, aggregation, update and evaluation.

Each task calls one plain ``fl_components`` function. Local training and site evaluation
read the site's files, so they may be retried; aggregation and the update are pure and are
not. Tasks never cache: inputs are model weights, and hashing them each round costs time
without saving any.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from fl_components.config import FederationConfig
from fl_components.data.types import DatasetInfo, Split
from fl_components.errors import FedpipeError
from fl_components.federation import Site, site_folder
from fl_components.parameters import NDArrays
from fl_components.round.types import LocalUpdate, Metrics
from fl_components.site.models import build_model
from fl_components.site.training import evaluate
from fl_components.strategies import AggregatedUpdate, ServerState, Strategy, weighted_average


def retry_unless_deliberate(task: object, task_run: object, state: State) -> bool:
    """Retry transient failures only: a refused budget or bad data fails the same way again."""
    try:
        state.result()
    except FedpipeError:
        return False
    except Exception:
        return True
    return True


def _site(config: FederationConfig, info: DatasetInfo, name: str) -> Site:
    return Site(name=name, folder=site_folder(config, name), config=config, info=info)


@task(
    name="local_train",
    task_run_name="local_train-{site}-r{round_num}",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=1,
    retry_condition_fn=retry_unless_deliberate,
)
def local_train(
    config: FederationConfig,
    info: DatasetInfo,
    global_parameters: NDArrays,
    *,
    site: str,
    round_num: int,
    seed: int,
) -> LocalUpdate:
    """Train at ``site`` from the global parameters of this round."""
    return _site(config, info, site).train(global_parameters, round_num=round_num, seed=seed)


@task(name="evaluate_site", task_run_name="evaluate-{site}-r{round_num}", cache_policy=NO_CACHE)
def evaluate_site(
    config: FederationConfig, info: DatasetInfo, parameters: NDArrays, *, site: str, round_num: int
) -> Metrics:
    """Score the global model on ``site``'s held-out split."""
    return _site(config, info, site).evaluate(parameters)


@task(name="aggregate", task_run_name="aggregate-r{round_num}", cache_policy=NO_CACHE)
def aggregate(updates: list[LocalUpdate], *, round_num: int) -> NDArrays:
    """FedAvg's example-weighted mean of the round's updates."""
    return weighted_average([(u.delta, u.num_examples) for u in updates])


@task(name="update_global", task_run_name="update_global-r{round_num}", cache_policy=NO_CACHE)
def update_global(
    strategy: Strategy, state: ServerState, mean_update: NDArrays, *, round_num: int
) -> ServerState:
    """Apply the server rule: θ_{t+1} from θ_t and the mean update."""
    return strategy.apply(state, AggregatedUpdate(delta=mean_update, participants=0))


@task(name="evaluate_global", task_run_name="evaluate_global-r{round_num}", cache_policy=NO_CACHE)
def evaluate_global(
    config: FederationConfig,
    info: DatasetInfo,
    parameters: NDArrays,
    test: Split,
    *,
    round_num: int,
) -> Metrics:
    """Score the global model on the central test split."""
    model = build_model(config.model, info, seed=config.seed)
    return evaluate(model, parameters, test, device=config.training.device)
