"""The federated statistics' privacy rules: minimum cohort, DP noise, the site's ledger.

Plays the attacker: a config asking for statistics of too few sites or rows is refused; a
site's noised statistics carry Gaussian noise of the calibrated std (measured over many
draws); the epsilon each release costs is in the site's ledger and recomputes from it; a
release past the site's budget is refused before anything leaves it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl_components.data.check import dataset_info, load_configured_site, site_folder
from fl_components.data.statistics import clipped_sums, sensitivity
from fl_components.errors import BudgetExhaustedError, ConfigError, DataError
from fl_components.federated_statistics import (
    federation_statistics,
    noise_multiplier_for,
    public_bounds,
)
from fl_components.privacy.epsilon import epsilon_of
from fl_components.privacy.ledger import LEDGER_FILE, PrivacyLedger
from ops.cli.main import app
from tests.test_federated_statistics import COLUMNS, SIZES, _config, _write_sites, _yaml, runner

BOUNDS = {"income": (0.0, 100_000.0), "age": (0.0, 100.0)}


def _private(tmp_path: Path, **rules: Any) -> Any:
    privacy = {"epsilon": 1.0, "delta": 1e-5, "clip": 1.0, **rules}
    return _config(tmp_path, secure=False, statistics_privacy=privacy)


def test_fewer_sites_than_min_sites_are_refused(tmp_path: Path) -> None:
    _write_sites(tmp_path)
    config = _config(tmp_path, secure=False, sites=("north",))

    with pytest.raises(ConfigError, match=r"data.statistics_privacy.min_sites = 2"):
        federation_statistics(config)
    raised = _config(tmp_path, secure=False, statistics_privacy={"min_sites": 5})
    with pytest.raises(ConfigError, match="add sites"):
        federation_statistics(raised)


def test_fewer_rows_than_min_rows_are_refused(tmp_path: Path) -> None:
    _write_sites(tmp_path)
    config = _config(tmp_path, secure=False, statistics_privacy={"min_rows": 10_000})

    with pytest.raises(DataError, match=r"data.statistics_privacy.min_rows = 10000"):
        federation_statistics(config)


def test_epsilon_without_bounds_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.statistics_privacy\.clip"):
        _config(tmp_path, secure=False, statistics_privacy={"epsilon": 1.0})


def test_noise_has_the_calibrated_std(tmp_path: Path) -> None:
    _write_sites(tmp_path)
    config = _private(tmp_path)
    info = dataset_info(config)
    z = noise_multiplier_for(1.0, 1e-5, accountant="rdp")
    exact = {}
    for name in config.site_names:
        data = load_configured_site(config, name, site_folder(config, name), info=info)
        low, high = public_bounds(config.data.statistics_privacy, data.train.columns)
        exact[name] = clipped_sums(data.train, n_classes=2, low=low, high=high).vector()
    sigma = z * sensitivity(low, high)
    assert sigma == pytest.approx(z * math.sqrt(2 + 3 + 3))  # count, class, 3 sums, 3 squares
    bounded = public_bounds(_private(tmp_path, bounds=BOUNDS).data.statistics_privacy, COLUMNS)
    assert sensitivity(*bounded) == pytest.approx(math.sqrt(2 + 1e10 + 1e4 + 1 + 1e20 + 1e8 + 1))

    draws = [
        (sums.vector() - exact[name]) / sigma
        for _ in range(60)
        for name, sums in federation_statistics(config).per_site.items()
    ]
    noise = np.concatenate(draws)  # 60 draws x 4 sites x 9 statistics, in units of sigma
    assert abs(noise.mean()) < 0.1
    assert noise.std() == pytest.approx(1.0, rel=0.06)


def test_epsilon_is_in_the_ledger_and_recomputes(tmp_path: Path) -> None:
    _write_sites(tmp_path)
    config = _private(tmp_path)

    result = federation_statistics(config)

    assert result.scaling().epsilon == 1.0
    for name in config.site_names:
        raw = json.loads((site_folder(config, name) / LEDGER_FILE).read_text())
        (entry,) = raw["entries"]
        assert entry["mechanism"] == "statistics"
        assert (entry["sample_rate"], entry["steps"]) == (1.0, 1)
        recomputed = epsilon_of([(entry["noise_multiplier"], 1.0, 1)], delta=1e-5, accountant="rdp")
        assert 0.99 < recomputed <= 1.0
        ledger = PrivacyLedger.load(site_folder(config, name) / LEDGER_FILE)
        assert ledger.epsilon(1e-5) == pytest.approx(recomputed)


def test_a_release_past_the_budget_is_refused(tmp_path: Path) -> None:
    _write_sites(tmp_path)
    config = _private(tmp_path).model_copy(deep=True)
    budgeted = type(config).model_validate(
        {**config.model_dump(mode="json", exclude_unset=True), "privacy": {"max_epsilon": 1.2}}
    )
    federation_statistics(budgeted)  # epsilon 1 of 1.2 (two compose under RDP to about 1.4)

    with pytest.raises(BudgetExhaustedError, match=r"past privacy\.max_epsilon 1\.2"):
        federation_statistics(budgeted)  # a second release would pass it
    ledger = PrivacyLedger.load(site_folder(config, "north") / LEDGER_FILE)
    assert len(ledger.entries) == 1  # nothing charged for the refused release


def test_noised_statistics_still_scale_under_secure_aggregation(tmp_path: Path) -> None:
    _write_sites(tmp_path)
    privacy = {"epsilon": 4.0, "delta": 1e-5, "clip": 1.0}
    config = _config(tmp_path, secure=True, statistics_privacy=privacy)

    result = federation_statistics(config)

    assert result.secure and result.epsilon == 4.0 and not result.per_site
    assert abs(result.stats.count - sum(SIZES.values())) < 100
    assert result.stats.mean[1] == pytest.approx(1.0, abs=0.05)  # every age clipped to 1


def test_fedpipe_stats_refuses_one_site_and_reports_the_noise(tmp_path: Path) -> None:
    _write_sites(tmp_path)
    path = _yaml(tmp_path, _private(tmp_path))

    one = runner.invoke(app, ["stats", str(path), "--site", "north"], terminal_width=200)
    noised = runner.invoke(app, ["stats", str(path)], terminal_width=200)

    assert one.exit_code == 2 and "min_sites" in one.output and "Traceback" not in one.output
    assert noised.exit_code == 0, noised.output
    assert "epsilon 1 each, charged to its privacy ledger" in " ".join(noised.output.split())


def test_the_sites_own_policy_caps_the_statistics_budget(tmp_path: Path) -> None:
    """The config sets no budget, but north's own policy.yaml says 1.2 in all: the second
    release is refused at north, whatever the config says (a job cannot lift a site's cap)."""
    from fl_components.site.policy import PrivacyFloor, SitePolicy, policy_path

    _write_sites(tmp_path)
    config = _private(tmp_path)
    assert config.privacy.max_epsilon is None
    SitePolicy(
        federation=config.name,
        coordinator_key_id="0" * 64,
        privacy=PrivacyFloor(max_epsilon_total=1.2),
    ).save(policy_path(site_folder(config, "north")))
    federation_statistics(config)  # epsilon 1 of north's 1.2

    with pytest.raises(BudgetExhaustedError, match=r"1\.2"):
        federation_statistics(config)
    ledger = PrivacyLedger.load(site_folder(config, "north") / LEDGER_FILE)
    assert len(ledger.entries) == 1
