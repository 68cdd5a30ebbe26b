"""The site's policy, played by a coordinator asking for less: each floor refuses, naming its line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fl_components.config import FederationConfig
from fl_components.errors import ConfigError
from fl_components.site.policy import (
    SitePolicy,
    check_features,
    check_job,
    check_round_spend,
    enforce,
    load_policy,
    policy_from_federation,
    policy_path,
    task_code_digest,
)
from fl_components.wire.rejection import PolicyBreach, RejectedJob, RejectReason

KEY = "ab" * 32
CODE = "cd" * 32


def _config(**sections: Any) -> FederationConfig:
    raw: dict[str, Any] = {
        "name": "fed",
        "rounds": 5,
        "sites": [{"name": f"site-{c}"} for c in "abcd"],
        "participation": {"min_participants": 3},
        "privacy": {"mode": "record", "noise_multiplier": 1.1, "max_epsilon": 8.0, "delta": 1e-5},
        "secure_aggregation": {"enabled": True, "threshold": 3},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values} if isinstance(values, dict) else values
    return FederationConfig.model_validate(raw)


@pytest.fixture
def policy() -> SitePolicy:
    return SitePolicy.model_validate(
        {
            "federation": "fed",
            "coordinator_key_id": KEY,
            "privacy": {
                "record_dp_required": True,
                "min_noise_multiplier": 1.0,
                "max_epsilon_per_run": 3.0,
                "max_epsilon_total": 8.0,
                "delta": 1e-5,
            },
            "secure_aggregation": {"required": True, "min_cohort": 3, "min_threshold": 3},
            "rounds": {"max_per_run": 10, "max_per_day": 20},
            "columns": {"labels": ["label"]},
        }
    )


def _check(policy: SitePolicy, config: FederationConfig, **job: Any) -> None:
    facts: dict[str, Any] = {
        "stage": "mask",
        "round_num": 1,
        "key_id": KEY,
        "task_code": CODE,
        "installed_task_code": CODE,
        "cohort": 4,
        "threshold": 3,
        "rounds_today": 0,
    }
    facts.update(job)
    check_job(policy, config, **facts)


def _line(policy: SitePolicy, config: FederationConfig, **job: Any) -> str:
    with pytest.raises(PolicyBreach) as caught:
        _check(policy, config, **job)
    assert caught.value.reason is RejectReason.POLICY
    return caught.value.line


def test_the_federation_as_configured_passes(policy) -> None:
    _check(policy, _config())
    _check(policy, _config(), stage="evaluate", cohort=None, threshold=None)


@pytest.mark.parametrize(
    ("sections", "job", "line"),
    [
        ({"name": "other"}, {}, "federation"),
        ({}, {"key_id": "ef" * 32}, "coordinator_key_id"),
        ({}, {"task_code": "00" * 32}, "task_code.accepted"),
        ({"rounds": 50}, {}, "rounds.max_per_run"),
        ({}, {"round_num": 11}, "rounds.max_per_run"),
        ({}, {"rounds_today": 20}, "rounds.max_per_day"),
        ({"data": {"label_column": "diagnosis"}}, {}, "columns.labels"),
        # the attacks: privacy off, participant-level only, noise 0.3, delta lifted
        (
            {"privacy": {"mode": "off", "noise_multiplier": None, "max_epsilon": None}},
            {},
            "privacy.record_dp_required",
        ),
        (
            {"privacy": {"mode": "participant", "noise_multiplier": None}},
            {},
            "privacy.record_dp_required",
        ),
        ({"privacy": {"noise_multiplier": 0.3}}, {}, "privacy.min_noise_multiplier"),
        (
            {"privacy": {"noise_multiplier": None, "target_epsilon": 50.0, "max_epsilon": None}},
            {},
            "privacy.max_epsilon_per_run",
        ),
        ({"privacy": {"delta": 0.1}}, {}, "privacy.delta"),
        # secure aggregation off, the clear stage, a cohort or threshold below the floor
        (
            {"secure_aggregation": {"enabled": False, "threshold": None}},
            {},
            "secure_aggregation.required",
        ),
        ({}, {"stage": "train"}, "secure_aggregation.required"),
        ({}, {"cohort": 2}, "secure_aggregation.min_cohort"),
        ({}, {"threshold": 1}, "secure_aggregation.min_threshold"),
        ({}, {"stage": "unmask", "threshold": 1}, "secure_aggregation.min_threshold"),
    ],
)
def test_a_job_asking_for_less_is_refused_naming_the_line(policy, sections, job, line) -> None:
    assert _line(policy, _config(**sections), **job).startswith(line)


def test_participant_level_floor(policy) -> None:
    strict = policy.model_copy(
        update={
            "privacy": policy.privacy.model_copy(
                update={"participant_dp_required": True, "min_client_noise_multiplier": 1.0}
            )
        }
    )
    assert _line(strict, _config()).startswith("privacy.participant_dp_required")
    both = {"mode": "both", "client_noise_multiplier": 0.5}
    assert _line(strict, _config(privacy=both)).startswith("privacy.min_client_noise_multiplier")
    _check(strict, _config(privacy={"mode": "both", "client_noise_multiplier": 1.2}))


def test_a_secure_stage_without_its_cohort_is_malformed(policy) -> None:
    with pytest.raises(RejectedJob) as caught:
        _check(policy, _config(), cohort=None)
    assert caught.value.reason is RejectReason.MALFORMED


def test_the_budget_and_delta_come_from_the_policy_not_the_job(policy) -> None:
    lifted = _config(privacy={"max_epsilon": None, "delta": None})
    _check(policy, lifted)  # not refused: the site applies its own budget instead
    enforced = enforce(policy, lifted)
    assert enforced.privacy.max_epsilon == 8.0 and enforced.privacy.delta == 1e-5
    stricter = enforce(policy, _config(privacy={"max_epsilon": 2.0, "delta": 1e-7}))
    assert stricter.privacy.max_epsilon == 2.0 and stricter.privacy.delta == 1e-7
    # the rest of the job's config is untouched
    assert enforced.model_dump(exclude={"privacy"}) == lifted.model_dump(exclude={"privacy"})


def test_round_spend_is_checked_with_the_sigma_the_site_derived(policy) -> None:
    check_round_spend(policy, noise_multiplier=1.2, epsilon_run_after=2.9)
    with pytest.raises(PolicyBreach, match=r"privacy.min_noise_multiplier"):
        check_round_spend(policy, noise_multiplier=0.6, epsilon_run_after=0.5)
    with pytest.raises(PolicyBreach, match=r"privacy.max_epsilon_per_run"):
        check_round_spend(policy, noise_multiplier=1.2, epsilon_run_after=3.01)


def test_feature_columns(policy) -> None:
    check_features(policy, ["age", "secret_id"])  # no feature rule: any
    ruled = policy.model_copy(
        update={"columns": policy.columns.model_copy(update={"features": ("age", "bp")})}
    )
    check_features(ruled, ["age", "bp"])
    with pytest.raises(PolicyBreach, match="secret_id"):
        check_features(ruled, ["age", "secret_id"])


def test_the_policy_written_from_the_federation_accepts_it(tmp_path: Path) -> None:
    config = _config()
    written = policy_from_federation(config, coordinator_key_id=KEY)
    path = written.save(policy_path(tmp_path))
    loaded = load_policy(path)
    assert loaded == written
    assert loaded.secure_aggregation.required and loaded.privacy.min_noise_multiplier == 1.1
    _check(loaded, config)
    assert _line(loaded, _config(privacy={"noise_multiplier": 0.5})).startswith(
        "privacy.min_noise_multiplier"
    )
    assert "data steward" in path.read_text()


def test_a_bad_policy_file_names_the_setting_and_value(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    with pytest.raises(ConfigError, match="site init"):
        load_policy(path)
    path.write_text(
        f"federation: fed\ncoordinator_key_id: '{KEY}'\nsecure_aggregation:\n  min_cohort: 2\n"
    )
    with pytest.raises(ConfigError, match=r"secure_aggregation.min_cohort.*got 2"):
        load_policy(path)
    path.write_text(f"federation: fed\ncoordinator_key_id: '{KEY}'\nprivacy:\n  min_noise: 1\n")
    with pytest.raises(ConfigError, match=r"privacy\.min_noise: is not a known setting"):
        load_policy(path)
    path.write_text(
        f"federation: fed\ncoordinator_key_id: '{KEY}'\n"
        "privacy:\n  max_epsilon_per_run: 5\n  max_epsilon_total: 2\n"
    )
    with pytest.raises(ConfigError, match="max_epsilon_per_run"):
        load_policy(path)


def test_task_code_digest_changes_with_any_source_byte(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    (package / "sub" / "b.py").write_text("y = 2\n")
    before = task_code_digest(package)
    assert task_code_digest(package) == before
    (package / "sub" / "b.py").write_text("y = 3\n")
    assert task_code_digest(package) != before
