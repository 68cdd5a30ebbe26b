"""Run names: from the merged config, with the strategy; a name the user gave is kept."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from prefect.utilities.names import generate_slug

from fl_components.config import config_from_dict
from flows.naming import config_run_name, is_random_name, run_name


def test_a_run_is_named_by_federation_strategy_and_start() -> None:
    config = config_from_dict({"name": "stack-demo", "strategy": {"name": "fedadam"}})
    started = datetime(2026, 12, 2, 11, 30, 5, tzinfo=UTC)

    assert config_run_name(config, started=started) == "stack-demo-fedadam-20261202-113005"
    assert run_name("x", started=started) == "x-20261202-113005"


def test_prefects_random_names_are_recognised() -> None:
    # the server's default name (coolname) and the UI's pre-filled Run Name
    assert all(is_random_name(generate_slug(2)) for _ in range(500))
    for ui_name in ("alpha3-andromedae-nebula", "omega-canis-majoris", "beta12-ceti"):
        assert is_random_name(ui_name), ui_name
    assert is_random_name(None) and is_random_name("")


@pytest.mark.parametrize(
    "name", ["baseline-run", "fedadam-lr0.05", "stack-demo-fedavg-20261202-113005", "Sweep 3"]
)
def test_a_name_a_user_gives_is_kept(name: str) -> None:
    assert not is_random_name(name)
