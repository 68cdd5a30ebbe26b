"""A run of the deployment given some config fields gets the deployment's for the rest."""

from __future__ import annotations

import pytest

from fl_components.config import FederationConfig
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
    config, how = run_config(_given({"rounds": 7, "tracking": {"register_model": False}}), DEPLOYED)

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
    config, how = run_config(_given(DEPLOYED), DEPLOYED)

    assert config.name == "stack-demo" and how == "the run gave every field of the config"


def test_outside_a_deployment_the_config_is_used_as_given() -> None:
    given = _given({"rounds": 3})

    config, how = run_config(given, None)

    assert config is given and config.backend == "local" and "not a deployment run" in how
