"""CompressionConfig: what combines with secure aggregation and DP, and what is refused."""

from __future__ import annotations

import pytest

from fl_components.config import config_from_dict
from fl_components.errors import ConfigError

SECAGG = {"enabled": True}
PARTICIPANT_DP = {"mode": "participant"}


def test_default_is_off() -> None:
    config = config_from_dict({})
    assert config.compression.method == "none" and not config.compression.enabled


@pytest.mark.parametrize(
    ("compression", "secagg", "privacy"),
    [
        ({"method": "qsgd", "bits": 4}, SECAGG, {}),
        ({"method": "random_k"}, SECAGG, {}),
        ({"method": "top_k", "fraction": 0.01}, {}, {}),
        # In the clear the coordinator clips the decoded update, then noises: any method.
        ({"method": "top_k"}, {}, PARTICIPANT_DP),
        ({"method": "qsgd", "bits": 4}, {}, PARTICIPANT_DP),
        ({"method": "qsgd"}, SECAGG, {"mode": "record", "noise_multiplier": 1.0}),
    ],
)
def test_accepted_combinations(compression: dict, secagg: dict, privacy: dict) -> None:
    config_from_dict({"compression": compression, "secure_aggregation": secagg, "privacy": privacy})


@pytest.mark.parametrize(
    ("compression", "secagg", "privacy", "names"),
    [
        ({"method": "top_k"}, SECAGG, {}, ("compression.method", "random_k")),
        ({"method": "qsgd"}, SECAGG | {"bits": 12}, {}, ("secure_aggregation.bits", "null")),
        ({"method": "qsgd"}, SECAGG, PARTICIPANT_DP, ("compression.method", "privacy.mode")),
        (
            {"method": "random_k", "error_feedback": False},
            SECAGG,
            PARTICIPANT_DP,
            ("secure_aggregation.enabled", "privacy.mode"),
        ),
    ],
)
def test_refused_combinations_name_both_settings(
    compression: dict, secagg: dict, privacy: dict, names: tuple[str, str]
) -> None:
    with pytest.raises(ConfigError) as error:
        config_from_dict(
            {"compression": compression, "secure_aggregation": secagg, "privacy": privacy}
        )
    assert all(name in str(error.value) for name in names)


def test_bits_out_of_range_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"compression\.bits"):
        config_from_dict({"compression": {"method": "qsgd", "bits": 1}})
