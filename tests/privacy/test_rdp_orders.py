"""The RDP orders cover the regime: no 'Optimal order is the largest alpha' warning."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from fl_components.config import load_config
from fl_components.data.site_files import load_site
from fl_components.federation import materialize_sites, site_folder
from fl_components.privacy.ledger import RDP_ORDERS, epsilon_of
from fl_components.site.dpsgd import plan_round


def test_hospitals_dp_settings_account_without_the_end_of_range_warning(tmp_path: Path) -> None:
    config = load_config("examples/hospitals-dp.yaml")
    config = config.model_validate(
        {
            **config.model_dump(exclude_unset=True),
            "data": {**config.data.model_dump(exclude_unset=True), "sites_dir": str(tmp_path)},
        }
    )
    materialize_sites(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the old orders warned here (in the sigma search too)
        for site in config.site_names:
            examples = len(load_site(site_folder(config, site)).train)
            plan = plan_round(
                examples=examples,
                privacy=config.privacy,
                training=config.training,
                rounds=config.rounds,
            )
            for rounds in (1, config.rounds):
                history = [(plan.noise_multiplier, plan.sample_rate, plan.steps * rounds)]
                epsilon = epsilon_of(history, delta=plan.delta, accountant="rdp")
            assert epsilon == pytest.approx(3.0, abs=0.011)  # the target, as Opacus found it


def test_orders_extend_opacus_defaults() -> None:
    from opacus.accountants import RDPAccountant

    assert set(RDPAccountant.DEFAULT_ALPHAS) <= set(RDP_ORDERS)
    assert max(RDP_ORDERS) >= 4096 and min(RDP_ORDERS) < 1.1
