"""The coordinator as deployed: the training flow, its run named, its config merged.

A run of the ``federated-training`` deployment may be created with a whole config (the
UI's form, filled with the deployment's values), or from a script with only some fields
(``{"config": {"rounds": 8}}``) or with a file such as ``infra/federation.yaml``. Prefect
replaces the deployment's ``config`` parameter wholesale, and every field the script left
out would take its model default: ``backend: local`` (the coordinator reading the sites'
data itself) and a local SQLite MLflow store. So the fields a run gives are merged into
the deployment's own config, and a run that would move the deployed coordinator onto
another backend is refused. The run's log says which fields came from where.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.states import State

from fl_components.config import FederationConfig, config_from_dict
from fl_components.errors import ConfigError
from flows.federated_training import TrainingSummary, federated_training
from flows.naming import coordinator_run_name


def merge_fields(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` with every field of ``given`` put in; sections merge, values replace.

    A list (the sites, the hidden layers) is a value: the run's list replaces the default.
    """
    merged = dict(defaults)
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_fields(merged[key], value)
        else:
            merged[key] = value
    return merged


def _leaves(fields: dict[str, Any], prefix: str = "") -> list[str]:
    names = []
    for key, value in fields.items():
        if isinstance(value, dict) and value:
            names += _leaves(value, f"{prefix}{key}.")
        else:
            names.append(f"{prefix}{key}")
    return names


def run_config(
    given: FederationConfig, deployed: dict[str, Any] | None
) -> tuple[FederationConfig, str]:
    """The config a deployed run trains with, and one line saying how it was made.

    ``given`` is the run's ``config`` parameter; only the fields it really set (pydantic's
    ``fields_set``, section by section) are taken from it, the rest from ``deployed`` (the
    deployment's ``config`` parameter; None: not a deployment run, ``given`` is used).

    Raises
    ------
    ConfigError
        If the run sets a backend other than the deployment's, or the merge is not valid.
    """
    if deployed is None:
        return given, "not a deployment run: the config as given"
    fields = given.model_dump(mode="json", exclude_unset=True)
    backend = deployed.get("backend", "local")
    if fields.get("backend", backend) != backend:
        raise ConfigError(
            f"config.backend {fields['backend']!r}: this deployment runs on backend "
            f"{backend!r}; a run on another backend would read the sites' data here, on the "
            "coordinator. Leave 'backend' out of the run's config (or run it locally: "
            "`fedpipe run FILE`)"
        )
    merged = merge_fields(deployed, fields)
    config = config_from_dict(merged, source="the run's config merged into the deployment's")
    if merged == fields:
        return config, "the run gave every field of the config"
    changed = [name for name in _leaves(fields) if _value(deployed, name) != _value(merged, name)]
    shown = ", ".join(changed[:12]) + (", ..." if len(changed) > 12 else "")
    return config, (
        f"the run's config set {len(_leaves(fields))} field(s), {len(changed)} differing from "
        f"the deployment's ({shown or 'none'}); every other field is the deployment's"
    )


def _value(fields: dict[str, Any], dotted: str) -> Any:
    value: Any = fields
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _deployment_config() -> dict[str, Any] | None:
    """The ``config`` parameter of the deployment this run belongs to (None: no deployment)."""
    from prefect.runtime import deployment

    deployment_id = deployment.id
    if not deployment_id:
        return None
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        parameters = client.read_deployment(deployment_id).parameters
    config = parameters.get("config")
    return dict(config) if isinstance(config, dict) else None


@flow(name="federated-training", flow_run_name=coordinator_run_name, log_prints=True)
def deployed_training(
    config: FederationConfig = FederationConfig(),  # noqa: B008
    resume: str | None = None,
) -> TrainingSummary | State[None]:
    """Train the federation with the run's config merged into the deployment's (see module).

    ``resume``: an MLflow run id to go on with from its last checkpoint (flows.resume).
    """
    merged, how = run_config(config, _deployment_config())
    get_run_logger().info("config: %s", how)
    return federated_training.fn(merged, resume=resume)
