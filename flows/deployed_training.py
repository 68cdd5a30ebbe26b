"""The coordinator as deployed: the training flow, its run named, its config merged.

A run of the ``federated-training`` deployment may be created with a whole config (the
UI's form, filled with the deployment's values), or from a script with only some fields
(``{"config": {"rounds": 8}}``) or with a file such as ``infra/federation.yaml``. Prefect
replaces the deployment's ``config`` parameter wholesale, and every field the script left
out would take its model default: ``backend: local`` (the coordinator reading the sites'
data itself) and a local SQLite MLflow store. So the fields a run gives are merged into
the deployment's own config, and a run that would move the deployed coordinator onto
another backend is refused. The run's log says which fields came from where.

The form posts every field it shows, the deployment's values among them: a server step η
the deployment set for its rule, carried into another rule, is re-resolved to the new
rule's default when it was the old rule's default, and named in a warning otherwise. The
run is named from the merged config (:mod:`flows.naming`), unless the user named it.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.states import State

from fl_components.config import FederationConfig, config_from_dict, default_server_lr
from fl_components.errors import ConfigError
from flows.federated_training import TrainingSummary, federated_training
from flows.naming import config_run_name, coordinator_run_name, given_run_name


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


def carried_server_lr(
    deployed: dict[str, Any], merged: dict[str, Any]
) -> tuple[dict[str, Any], str | None]:
    """``merged`` with a server step η carried over from the deployment's rule handled.

    The deployment's ``strategy.server_lr`` belongs to its ``strategy.name``. When the run
    switches the rule and keeps that η (a form posts it back unchanged): if it is the old
    rule's default (a deployment made before defaults were resolved at run time), it is
    cleared so the new rule's own default applies; otherwise it is kept, and named in the
    returned warning (None: nothing carried over).
    """
    old = dict(deployed.get("strategy") or {})
    new = dict(merged.get("strategy") or {})
    old_rule, new_rule = old.get("name", "fedavg"), new.get("name", "fedavg")
    carried = new.get("server_lr")
    if old_rule == new_rule or carried is None or carried != old.get("server_lr"):
        return merged, None
    default = (
        "its own rule (L = 1/training.lr)"
        if new_rule == "qfedavg"
        else (f"its default {default_server_lr(new_rule)}")
    )
    if carried == default_server_lr(old_rule):
        resolved = {**merged, "strategy": {**new, "server_lr": None}}
        return resolved, (
            f"strategy.server_lr {carried} is {old_rule!r}'s default, carried over from the "
            f"deployment into {new_rule!r}: re-resolved, {new_rule!r} steps by {default}"
        )
    return merged, (
        f"strategy.server_lr {carried} was set for the deployment's {old_rule!r} and is kept "
        f"for {new_rule!r} (which would otherwise step by {default}); clear the field to use "
        "the rule's default"
    )


def run_config(
    given: FederationConfig, deployed: dict[str, Any] | None
) -> tuple[FederationConfig, str, list[str]]:
    """The config a deployed run trains with, one line saying how it was made, and warnings.

    ``given`` is the run's ``config`` parameter; only the fields it really set (pydantic's
    ``fields_set``, section by section) are taken from it, the rest from ``deployed`` (the
    deployment's ``config`` parameter; None: not a deployment run, ``given`` is used).

    Raises
    ------
    ConfigError
        If the run sets a backend other than the deployment's, or the merge is not valid.
    """
    if deployed is None:
        return given, "not a deployment run: the config as given", []
    fields = given.model_dump(mode="json", exclude_unset=True)
    backend = deployed.get("backend", "local")
    if fields.get("backend", backend) != backend:
        raise ConfigError(
            f"config.backend {fields['backend']!r}: this deployment runs on backend "
            f"{backend!r}; a run on another backend would read the sites' data here, on the "
            "coordinator. Leave 'backend' out of the run's config (or run it locally: "
            "`fedpipe run FILE`)"
        )
    merged, carried = carried_server_lr(deployed, merge_fields(deployed, fields))
    warnings = [carried] if carried else []
    config = config_from_dict(merged, source="the run's config merged into the deployment's")
    if merged == fields:
        return config, "the run gave every field of the config", warnings
    changed = [name for name in _leaves(fields) if _value(deployed, name) != _value(merged, name)]
    shown = ", ".join(changed[:12]) + (", ..." if len(changed) > 12 else "")
    return (
        config,
        (
            f"the run's config set {len(_leaves(fields))} field(s), {len(changed)} differing from "
            f"the deployment's ({shown or 'none'}); every other field is the deployment's"
        ),
        warnings,
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


def deployed_run_name() -> str:
    """The run's ``flow_run_name``: the name the user gave, else from the merged config.

    Prefect names the run before the flow body merges the config, so the merge is done here
    too; a config that does not merge (the run then fails, saying why) is named as given.
    """
    given = given_run_name()
    if given:
        return given
    from prefect.runtime import flow_run
    from pydantic import ValidationError

    raw = flow_run.parameters.get("config")
    try:
        config = (
            raw if isinstance(raw, FederationConfig) else FederationConfig.model_validate(raw or {})
        )
        merged, _, _ = run_config(config, _deployment_config())
    except (ConfigError, ValidationError):
        return coordinator_run_name()
    return config_run_name(merged)


@flow(name="federated-training", flow_run_name=deployed_run_name, log_prints=True)
def deployed_training(
    config: FederationConfig = FederationConfig(),  # noqa: B008
    resume: str | None = None,
) -> TrainingSummary | State[None]:
    """Train the federation with the run's config merged into the deployment's (see module).

    ``resume``: an MLflow run id to go on with from its last checkpoint (flows.resume).
    """
    merged, how, warnings = run_config(config, _deployment_config())
    logger = get_run_logger()
    logger.info("config: %s", how)
    for warning in warnings:
        logger.warning("config: %s", warning)
    return federated_training.fn(merged, resume=resume)
