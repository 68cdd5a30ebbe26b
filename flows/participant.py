"""The participant flow: one stage of one round, run by a site's own worker on its pool.

Parameters are references only: the federation config, the site's name, the round, the
stage, the global model's path in shared exchange storage and its SHA-256, the run id. The
site verifies the hash, works on its own folder (from its worker's environment) and returns
a JSON-safe payload, persisted with Prefect's JSON serializer (never pickle) to the result
storage the workers are configured with, where the coordinator reads it back.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger

from fl_components.config import FederationConfig
from fl_components.exchange import (
    metrics_payload,
    read_global_model,
    update_payload,
)
from fl_components.training import seed_for
from tasks.site_side import site_evaluate, site_train, this_site

Stage = Literal["train", "unmask", "evaluate"]


@flow(
    name="federated-participant",
    flow_run_name="{site}-r{round_num}-{stage}",
    result_serializer="json",
    persist_result=True,
    log_prints=True,
)
def federated_participant(
    federation: FederationConfig,
    site: str,
    round_num: int,
    stage: Stage,
    model_uri: str,
    model_sha256: str,
    run_id: str,
) -> dict[str, Any]:
    """Run ``stage`` of round ``round_num`` at ``site`` and return its JSON-safe payload."""
    logger = get_run_logger()
    participant = this_site(federation, site)
    if stage == "unmask":
        raise NotImplementedError(
            "stage 'unmask' answers secure aggregation's share requests; it is wired when "
            "secure aggregation runs over the work-pool backend"
        )
    parameters = read_global_model(model_uri, sha256=model_sha256)
    logger.info(
        "site %s run %s round %d: global model %s verified",
        site,
        run_id,
        round_num,
        model_sha256[:12],
    )
    if stage == "evaluate":
        metrics = site_evaluate(participant, parameters, round_num=round_num)
        return metrics_payload(metrics, site=site, round_num=round_num)
    index = federation.site_names.index(site)
    seed = seed_for(base=federation.seed, round_num=round_num, site_index=index)
    update = site_train(participant, parameters, round_num=round_num, seed=seed)
    return update_payload(update)
