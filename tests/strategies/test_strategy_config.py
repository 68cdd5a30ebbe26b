"""StrategyConfig: bounds, knobs that belong to another rule, config-time refusals, builder."""

import pytest

from fl_components.config import StrategyConfig, config_from_dict, flatten_config
from fl_components.errors import ConfigError
from fl_components.strategies import QFedAvg, Scaffold, build_strategy

NAMES = ["fedavg", "fedavgm", "fedprox", "scaffold", "fedadagrad", "fedadam", "fedyogi", "qfedavg"]


@pytest.mark.parametrize("name", NAMES)
def test_build_strategy_builds_every_rule(name: str) -> None:
    rule = build_strategy(StrategyConfig(name=name), num_sites=5, local_lr=0.05)
    assert rule.name == name
    params = rule.params()
    assert params["strategy.rule"] == name
    assert ("strategy.aggregator" in params) == (name != "qfedavg")


def test_builder_passes_the_federation_facts() -> None:
    scaffold = build_strategy(StrategyConfig(name="scaffold"), num_sites=7)
    assert isinstance(scaffold, Scaffold) and scaffold.num_sites == 7
    qffl = build_strategy(StrategyConfig(name="qfedavg", q=2.0), local_lr=0.05)
    assert isinstance(qffl, QFedAvg) and qffl.lipschitz == pytest.approx(20.0) and qffl.q == 2.0
    with pytest.raises(ConfigError, match="needs num_sites"):
        build_strategy(StrategyConfig(name="scaffold"))
    with pytest.raises(ConfigError, match="needs local_lr"):
        build_strategy(StrategyConfig(name="qfedavg"))


def test_server_lr_default_depends_on_the_rule() -> None:
    assert StrategyConfig(name="fedavg").effective_server_lr == 1.0
    assert StrategyConfig(name="fedadam").effective_server_lr == 0.1
    assert StrategyConfig(name="fedadam", server_lr=0.3).effective_server_lr == 0.3
    assert StrategyConfig(name="qfedavg").server_lr is None
    with pytest.raises(ValueError, match="qfedavg' steps by its own rule"):
        StrategyConfig(name="qfedavg", server_lr=0.5)


def test_knob_of_another_rule_is_refused() -> None:
    with pytest.raises(ConfigError) as error:
        config_from_dict({"strategy": {"name": "fedavg", "proximal_mu": 0.1}})
    message = str(error.value)
    assert "strategy.proximal_mu is set (0.1)" in message and "'fedavg'" in message
    assert "fedprox" in message
    with pytest.raises(ConfigError, match=r"strategy.byzantine_f is set"):
        config_from_dict({"strategy": {"aggregator": "median", "byzantine_f": 2}})


@pytest.mark.parametrize(
    "section",
    [{"name": n} for n in NAMES] + [{"aggregator": a} for a in ("median", "krum", "bulyan")],
)
def test_a_dumped_config_loads_again(section: dict[str, str]) -> None:
    # Prefect hands a deployment its config as model_dump(mode="json"): every knob present
    sites = [{"name": f"s{i}"} for i in range(8)]
    config = config_from_dict(
        {"sites": sites, "participation": {"min_participants": 7}, "strategy": section}
    )
    again = config_from_dict(config.model_dump(mode="json"))
    assert again == config


@pytest.mark.parametrize("name", NAMES)
def test_strategy_params_agree_with_the_logged_config(name: str) -> None:
    # the run logs the config as set and the rule's params (as strategy.effective.*): the
    # knobs agree; server_lr, unset in the config, is the rule's resolved η
    config = config_from_dict({"strategy": {"name": name}})
    flat = flatten_config(config)
    rule = build_strategy(config.strategy, num_sites=10, local_lr=config.training.lr)
    shared = {k: v for k, v in rule.params().items() if k in flat and k != "strategy.server_lr"}
    assert shared == {k: flat[k] for k in shared}
    assert flat["strategy.server_lr"] == "None"
    if name != "qfedavg":
        assert rule.params()["strategy.server_lr"] == repr(config.strategy.effective_server_lr)


def test_the_default_server_lr_is_not_frozen_into_the_config() -> None:
    """A form fills every field from the stored config: fedavg's η must not travel along."""
    stored = config_from_dict({"strategy": {"name": "fedavg"}})
    assert stored.strategy.server_lr is None
    every_field = stored.model_dump(mode="json")  # what the form posts back
    every_field["strategy"]["name"] = "fedadam"
    switched = config_from_dict(every_field)
    assert switched.strategy.effective_server_lr == 0.1
    rule = build_strategy(switched.strategy, num_sites=3, local_lr=0.05)
    assert rule.params()["strategy.server_lr"] == "0.1"


def test_bounds_name_the_field_and_value() -> None:
    with pytest.raises(ConfigError) as error:
        config_from_dict({"strategy": {"name": "fedavgm", "server_momentum": 1.5}})
    assert "strategy.server_momentum" in str(error.value) and "1.5" in str(error.value)
    with pytest.raises(ConfigError, match=r"strategy.aggregator: must be one of"):
        config_from_dict({"strategy": {"aggregator": "geomedian"}})


@pytest.mark.parametrize(
    ("strategy", "what"),
    [
        ({"aggregator": "median"}, "strategy.aggregator 'median'"),
        ({"name": "qfedavg"}, "strategy.name 'qfedavg'"),
        ({"name": "scaffold"}, "strategy.name 'scaffold'"),
    ],
)
def test_clear_update_rules_refused_under_secure_aggregation(strategy, what) -> None:
    with pytest.raises(ConfigError) as error:
        config_from_dict({"strategy": strategy, "secure_aggregation": {"enabled": True}})
    assert what in str(error.value) and "secure_aggregation.enabled" in str(error.value)


@pytest.mark.parametrize("mode", ["participant", "both"])
def test_clear_update_rules_refused_under_dp_fedavg(mode: str) -> None:
    privacy = {"mode": mode}
    if mode == "both":
        privacy["noise_multiplier"] = 1.0
    with pytest.raises(ConfigError) as error:
        config_from_dict({"strategy": {"aggregator": "krum"}, "privacy": privacy})
    assert "strategy.aggregator 'krum'" in str(error.value)
    assert f"privacy.mode {mode!r}" in str(error.value)


def test_rules_that_work_on_a_sum_are_allowed_under_secure_aggregation_and_dp() -> None:
    for name in ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad"):
        config_from_dict(
            {
                "strategy": {"name": name, "norm_bound": 1.0},
                "secure_aggregation": {"enabled": True},
                "privacy": {"mode": "participant"},
            }
        )


def test_bulyan_refused_when_the_smallest_round_is_too_small() -> None:
    sites = [{"name": f"s{i}"} for i in range(10)]
    with pytest.raises(ConfigError, match=r"needs every round to have >= 4f \+ 3 = 7"):
        config_from_dict(
            {
                "sites": sites,
                "participation": {"min_participants": 5},
                "strategy": {"aggregator": "bulyan"},
            }
        )
    config_from_dict(
        {
            "sites": sites,
            "participation": {"min_participants": 7},
            "strategy": {"aggregator": "bulyan"},
        }
    )


def test_qfedavg_refuses_a_robust_aggregator() -> None:
    with pytest.raises(ConfigError, match=r"strategy.aggregator: mean"):
        config_from_dict({"strategy": {"name": "qfedavg", "aggregator": "median"}})
