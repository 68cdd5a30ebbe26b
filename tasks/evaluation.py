"""The coordinator's own evaluation: the global model on the central test split.

A thin task around :func:`fl_components.site.training.evaluate`; it never caches (its input
is model weights, and hashing them each round costs time without saving any).
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from fl_components.config import FederationConfig
from fl_components.data.types import DatasetInfo, Split
from fl_components.parameters import NDArrays
from fl_components.round.types import Metrics
from fl_components.site.training import evaluate
from fl_components.task.loading import resolve_task


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
    task = resolve_task(config, info)
    model = task.build_model(config.seed)
    return evaluate(model, parameters, test, device=config.training.device, task=task)
