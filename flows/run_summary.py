"""What a finished run leaves for whoever opens it: a summary in Prefect, descriptions in MLflow.

The coordinator's flow run gets a markdown artifact (``<federation>-summary``): the two
final accuracies, each named for what it was measured on, the promotion decision and why,
links to the MLflow run and the model version, and the fields of the run's config that
differ from its deployment's. The MLflow run gets the same text as its description; the
registered version a description and tags (strategy, rounds, federated accuracy, source
run).
"""

from __future__ import annotations

from typing import Any

from prefect.runtime import deployment, flow_run
from pydantic import ValidationError

from fl_components.config import FederationConfig, flatten_config
from fl_components.promotion import PromotionDecision
from fl_components.tracking import RunTracker, model_version_url, run_url
from tasks.tracking import accuracy_lines, publish_summary, run_logger, summary_markdown


def config_difference(config: FederationConfig, deployed: Any) -> list[str] | None:
    """``field: deployment's -> run's`` for each field that differs (None: no deployment).

    ``deployed``: the deployment's ``config`` parameter, as Prefect stores it.
    """
    if not isinstance(deployed, dict):
        return None
    try:
        before = flatten_config(FederationConfig.model_validate(deployed))
    except ValidationError:  # a deployment made by another fedpipe: compare what is there
        return None
    after = flatten_config(config)
    keys = [k for k in after if before.get(k) != after[k]]
    keys += [k for k in before if k not in after]
    return [f"`{k}`: {before.get(k, '—')} -> {after.get(k, '—')}" for k in keys]


def _deployed_config() -> Any:
    """The deployment's own ``config`` parameter (None: not a deployment run).

    Read from the deployment itself: ``prefect.runtime.deployment.parameters`` is the flow
    run's parameters, the run's config rather than the deployment's.
    """
    deployment_id = deployment.id
    if not deployment_id:
        return None
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            return client.read_deployment(deployment_id).parameters.get("config")
    except Exception as error:  # the summary goes without the difference; the log says why
        run_logger().warning("deployment %s not read for the summary: %s", deployment_id, error)
        return None


def publish_run_summary(
    config: FederationConfig,
    tracker: RunTracker,
    *,
    final: dict[str, float],
    version: str | None,
    decision: PromotionDecision | None,
) -> str | None:
    """Write the run's summary to Prefect and MLflow; return its markdown.

    The model is registered and promoted by now: a summary that cannot be written (a
    server that does not answer) is a warning in the run's log, not a failed run (None).
    """
    try:
        return _publish(config, tracker, final=final, version=version, decision=decision)
    except Exception as error:  # any client's error: the run itself is done
        run_logger().warning(
            "the run's summary could not be written (%s: %s); its results are in MLflow run %s",
            type(error).__name__,
            error,
            tracker.run_id,
        )
        return None


def _describe_version(
    tracker: RunTracker,
    config: FederationConfig,
    version: str,
    *,
    final: dict[str, float],
    run_id: str,
    decision: PromotionDecision | None,
) -> None:
    """The registered version's description and tags: federated accuracy, source run, alias."""
    federated = final.get("sites/mean_accuracy", final.get("global/accuracy", float("nan")))
    tracker.describe_version(
        version,
        text=(
            f"{config.name}, {config.strategy.name}, {config.rounds} rounds: federated "
            f"accuracy {federated:.4f}, from MLflow run {run_id}."
            + ("" if decision is None else f" {decision.alias}: {decision.reason}")
        ),
        tags={
            "fedpipe.strategy": config.strategy.name,
            "fedpipe.rounds": str(config.rounds),
            "fedpipe.federated_accuracy": f"{federated:.4f}",
            "fedpipe.source_run": run_id,
            **({} if decision is None else {"fedpipe.promotion": decision.alias}),
        },
    )


def _publish(
    config: FederationConfig,
    tracker: RunTracker,
    *,
    final: dict[str, float],
    version: str | None,
    decision: PromotionDecision | None,
) -> str:
    run_id, experiment_id = tracker.run_id or "", tracker.experiment_id
    server = tracker.tracking_uri if tracker.tracking_uri.startswith("http") else None
    mlflow_run = (
        f"[{run_id}]({run_url(server, experiment_id=experiment_id, run_id=run_id)})"
        if server
        else f"`{run_id}` (experiment {experiment_id}, {tracker.tracking_uri})"
    )
    shown_version = None
    if version is not None:
        shown_version = (
            f"[{config.name} version {version}]"
            f"({model_version_url(server, name=config.name, version=version)})"
            if server
            else f"`models:/{config.name}/{version}`"
        )
    promotion = None if decision is None else f"**{decision.alias}**: {decision.reason}"
    markdown = summary_markdown(
        federation=config.name,
        strategy=config.strategy.name,
        rounds=config.rounds,
        final=final,
        promotion=promotion,
        mlflow_run=mlflow_run,
        model_version=shown_version,
        difference=config_difference(config, _deployed_config()),
    )
    publish_summary(config.name, markdown)
    prefect_run = str(flow_run.get_flow_run_ui_url() or "")
    tracker.describe(markdown + (f"\n\nPrefect flow run: {prefect_run}" if prefect_run else ""))
    if version is not None:
        _describe_version(tracker, config, version, final=final, run_id=run_id, decision=decision)
    where = run_url(server, experiment_id=experiment_id, run_id=run_id) if server else run_id
    run_logger().info(
        "run done: %s; MLflow run %s; %s",
        "; ".join(line.removeprefix("- ").replace("**", "") for line in accuracy_lines(final)),
        where,
        "no model registered" if promotion is None else f"version {version}, {promotion}",
    )
    return markdown
