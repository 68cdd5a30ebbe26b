"""DP-SGD runs the strategy's local objective: one training function, DP as a wrapper.

Under ``privacy.mode: record`` a site trains exactly as in plain training (FedProx's
proximal term, SCAFFOLD's correction), with Opacus's per-sample clipping and noise around
the data gradient; q-FedAvg's unnoised F_k(θ_t) is refused, by the config and the site.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl_components.config import config_from_dict
from fl_components.errors import ConfigError
from fl_components.federation import Site, dataset_info, materialize_sites, site_folder
from fl_components.parameters import get_parameters
from fl_components.privacy.dp_fedavg import global_norm
from fl_components.round.types import SiteInstructions
from fl_components.site.models import build_model

LR, EPOCHS = 0.05, 2


def _raw(tmp_path: Path, **strategy: Any) -> dict[str, Any]:
    return {
        "name": "record-objective",
        "sites": [{"name": "h1"}, {"name": "h2"}],
        "data": {"dataset": "digits", "sites_dir": str(tmp_path / "sites")},
        "model": {"kind": "logreg"},
        "training": {"epochs": EPOCHS, "batch_size": 32, "lr": LR, "momentum": 0.0},
        "strategy": {"name": "fedavg", **strategy},
        "privacy": {"mode": "record", "noise_multiplier": 0.3, "delta": 1e-5},
        "seed": 3,
    }


@pytest.fixture
def site(tmp_path: Path) -> Site:
    config = config_from_dict(_raw(tmp_path))
    materialize_sites(config)
    return Site(
        name="h1", folder=site_folder(config, "h1"), config=config, info=dataset_info(config)
    )


def _global(site: Site) -> list[np.ndarray]:
    return get_parameters(build_model(site.config.model, site.info, seed=site.config.seed))


def test_fedprox_under_dpsgd_stays_closer_to_the_global_model_as_mu_grows(site: Site) -> None:
    theta = _global(site)

    distances = [
        global_norm(
            site.train(
                theta, round_num=r, seed=7, instructions=SiteInstructions(proximal_mu=mu)
            ).delta
        )
        for r, mu in enumerate((0.0, 4.0, 16.0), start=1)
    ]

    assert distances[0] > distances[1] > distances[2], distances
    assert distances[2] < 0.5 * distances[0], distances


def test_scaffold_under_dpsgd_applies_the_correction_and_keeps_its_control(site: Site) -> None:
    theta = _global(site)
    control = [np.full(a.shape, 0.5, dtype=np.float32) for a in theta]

    plain = site.train(theta, round_num=1, seed=7, instructions=SiteInstructions())
    (site.folder / "scaffold_control.npz").unlink(missing_ok=True)
    corrected = site.train(
        theta, round_num=2, seed=7, instructions=SiteInstructions(server_control=control)
    )

    assert plain.control_delta is None
    assert corrected.control_delta is not None  # c_i⁺ - c_i, from the private θ_k
    assert (site.folder / "scaffold_control.npz").is_file()
    # every step's gradient carried + (c - c_i) = +0.5: the update drifts by -lr * 0.5 * K
    steps = corrected.extra["steps"]
    drift = np.mean(
        np.concatenate([(c - p).ravel() for c, p in zip(corrected.delta, plain.delta, strict=True)])
    )
    assert drift == pytest.approx(-LR * 0.5 * steps, rel=0.25)
    assert [a.shape for a in corrected.control_delta] == [a.shape for a in theta]


def test_qfedavg_with_record_level_dp_is_refused_by_the_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'qfedavg' weighs each site by F_k"):
        config_from_dict(_raw(tmp_path, name="qfedavg"))


def test_a_dpsgd_site_refuses_to_send_the_unnoised_initial_loss(site: Site) -> None:
    with pytest.raises(ConfigError, match="refuses round 1: q-FedAvg asks for the loss"):
        site.train(
            _global(site),
            round_num=1,
            seed=7,
            instructions=SiteInstructions(report_initial_loss=True),
        )
