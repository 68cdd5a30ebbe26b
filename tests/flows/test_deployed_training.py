"""A run of the deployment given some config fields gets the deployment's for the rest."""

from __future__ import annotations

import pytest

from fl_components.config import FederationConfig, config_from_dict
from fl_components.errors import ConfigError
from flows.deployed_training import deployed_training, merge_fields, run_config

DEPLOYED = {
    "name": "stack-demo",
    "backend": "work-pool",
    "sites": [{"name": "site-a"}, {"name": "site-b"}],
    "participation": {"fraction": 1.0, "min_participants": 2},
    "tracking": {"tracking_uri": "http://127.0.0.1:5000"},
    "deployment": {"exchange_dir": "/srv/exchange"},
}


def _given(fields: dict) -> FederationConfig:
    """The ``config`` parameter as Prefect validates it for the flow."""
    return deployed_training.validate_parameters({"config": fields})["config"]


def test_sections_merge_and_values_replace() -> None:
    merged = merge_fields({"a": {"x": 1, "y": 2}, "l": [1, 2]}, {"a": {"y": 3}, "l": [9]})

    assert merged == {"a": {"x": 1, "y": 3}, "l": [9]}


def test_a_partial_config_keeps_the_deployment_backend_and_tracking() -> None:
    config, how, _ = run_config(
        _given({"rounds": 7, "tracking": {"register_model": False}}), DEPLOYED
    )

    assert config.rounds == 7 and config.backend == "work-pool"
    assert config.tracking.tracking_uri == "http://127.0.0.1:5000"
    assert config.tracking.register_model is False
    assert config.deployment.exchange_dir == "/srv/exchange"
    assert config.site_names == ("site-a", "site-b")
    assert "set 2 field(s), 2 differing" in how and "rounds" in how


def test_another_backend_is_refused() -> None:
    with pytest.raises(ConfigError, match="this deployment runs on backend 'work-pool'"):
        run_config(_given({"backend": "local", "rounds": 2}), DEPLOYED)


def test_the_whole_deployment_config_is_taken_as_is() -> None:
    config, how, _ = run_config(_given(DEPLOYED), DEPLOYED)

    assert config.name == "stack-demo" and how == "the run gave every field of the config"


def test_outside_a_deployment_the_config_is_used_as_given() -> None:
    given = _given({"rounds": 3})

    config, how, _ = run_config(given, None)

    assert config is given and config.backend == "local" and "not a deployment run" in how


def _form_payload(deployed: dict, **strategy: object) -> dict:
    """What the UI's form posts: every field, pre-filled from the deployment, some changed."""
    every_field = config_from_dict(deployed).model_dump(mode="json")
    every_field["strategy"] = {**every_field["strategy"], **strategy}
    return every_field


def test_the_form_switching_strategy_trains_the_new_rules_server_step() -> None:
    deployed = {**DEPLOYED, "strategy": {"name": "fedavg", "server_lr": None}}  # as deployed

    config, _, warnings = run_config(_given(_form_payload(deployed, name="fedadam")), deployed)

    assert config.strategy.name == "fedadam" and config.strategy.effective_server_lr == 0.1
    assert warnings == []


def test_a_default_frozen_into_an_older_deployment_is_re_resolved_with_a_warning() -> None:
    deployed = {**DEPLOYED, "strategy": {"name": "fedavg", "server_lr": 1.0}}

    config, _, warnings = run_config(_given(_form_payload(deployed, name="fedadam")), deployed)

    assert config.strategy.effective_server_lr == 0.1
    assert len(warnings) == 1 and "'fedavg''s default" in warnings[0]
    assert "re-resolved" in warnings[0] and "0.1" in warnings[0]


def test_an_operator_set_server_lr_carried_into_another_rule_is_named() -> None:
    deployed = {**DEPLOYED, "strategy": {"name": "fedavg", "server_lr": 0.5}}

    config, _, warnings = run_config(_given(_form_payload(deployed, name="fedyogi")), deployed)

    assert config.strategy.effective_server_lr == 0.5  # kept: it may have been chosen
    assert len(warnings) == 1 and "0.5" in warnings[0] and "'fedyogi'" in warnings[0]
    assert "clear the field" in warnings[0]


def test_a_server_lr_the_run_changes_is_its_own() -> None:
    deployed = {**DEPLOYED, "strategy": {"name": "fedavg", "server_lr": 1.0}}
    payload = _form_payload(deployed, name="fedadam", server_lr=0.05)

    config, _, warnings = run_config(_given(payload), deployed)

    assert config.strategy.effective_server_lr == 0.05 and warnings == []
