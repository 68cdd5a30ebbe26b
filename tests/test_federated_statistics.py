"""The statistics stage: sites share sums only; every site standardizes with the pooled scale.

The federation's mean and std must equal pooled numpy statistics over every site's training
rows (exactly, up to the fixed point's 2^-24, under secure aggregation too), and a site must
refuse to train federation-scaled without them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fl_components.config import FederationConfig
from fl_components.data.statistics import (
    SiteSums,
    add_sums,
    from_limb_sums,
    to_limbs,
)
from fl_components.errors import ConfigError, DataError
from fl_components.federated_statistics import (
    federation_statistics,
    statistics_context,
    with_federation_scaling,
)
from fl_components.federation import Site, dataset_info
from ops.cli.data import checked_before_run
from ops.cli.main import app

runner = CliRunner()

COLUMNS = ["income", "age", "debt"]
SIZES = {"north": 150, "south": 450, "east": 60, "west": 900}


def _write_sites(root: Path) -> dict[str, pd.DataFrame]:
    """Unscaled bank-branch files, each branch centred elsewhere, columns in varied order."""
    rng = np.random.default_rng(7)
    frames = {}
    for i, (site, rows) in enumerate(SIZES.items()):
        x = rng.normal([40_000 + 9_000 * i, 45, 0.02], [12_000, 11, 0.004], size=(rows, 3))
        frame = pd.DataFrame(x, columns=COLUMNS)
        frame["label"] = (x[:, 0] > 50_000).astype(int)
        (root / site).mkdir(parents=True)
        order = COLUMNS[::-1] if i % 2 else COLUMNS
        frame[[*order, "label"]].to_csv(root / site / "train.csv", index=False)
        frame[[*order, "label"]].iloc[:20].to_csv(root / site / "test.csv", index=False)
        frames[site] = frame
    return frames


def _config(
    root: Path, *, secure: bool, sites: tuple[str, ...] = tuple(SIZES), **data: Any
) -> FederationConfig:
    return FederationConfig.model_validate(
        {
            "name": "branches",
            "sites": [{"name": s, "data_path": str(root / s)} for s in sites],
            "participation": {"min_participants": 1},
            "data": {
                "source": "site_files",
                "columns": COLUMNS,
                "n_classes": 2,
                "sites_dir": str(root / "federation"),
                "scale": "federation",
                **data,
            },
            "secure_aggregation": {"enabled": secure, "threshold": 3 if secure else None},
        }
    )


def _pooled(frames: dict[str, pd.DataFrame]) -> tuple[np.ndarray, np.ndarray]:
    # the sites read float32 features: pool the same values
    x = np.concatenate([f[COLUMNS].to_numpy(np.float32) for f in frames.values()])
    return x.astype(np.float64).mean(axis=0), x.astype(np.float64).std(axis=0)


@pytest.mark.parametrize("secure", [False, True], ids=["clear", "secure-aggregation"])
def test_the_federation_statistics_are_the_pooled_ones(tmp_path: Path, secure: bool) -> None:
    frames = _write_sites(tmp_path)
    config = _config(tmp_path, secure=secure)

    result = federation_statistics(config)

    mean, std = _pooled(frames)
    np.testing.assert_allclose(result.stats.mean, mean, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(result.stats.std, std, rtol=1e-6)
    assert result.stats.count == sum(SIZES.values()) and result.inputs == tuple(COLUMNS)
    labels = np.concatenate([f["label"].to_numpy() for f in frames.values()])
    assert result.stats.label_counts.tolist() == np.bincount(labels).tolist()
    assert result.secure is secure
    # under secure aggregation the coordinator holds no site's own statistics
    assert (result.per_site == {}) is secure


def test_every_site_standardizes_with_the_same_federation_scale(tmp_path: Path) -> None:
    frames = _write_sites(tmp_path)
    config = with_federation_scaling(_config(tmp_path, secure=True))

    assert config.data.scaling is not None and config.data.scaling.secure
    info = dataset_info(config)
    loaded = [Site(s, tmp_path / s, config, info).load() for s in SIZES]

    pooled = np.concatenate([d.train.features for d in loaded]).astype(np.float64)
    np.testing.assert_allclose(pooled.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(pooled.std(axis=0), 1.0, atol=1e-5)
    # one scale for all: a site's own mean is not 0 (each branch is centred elsewhere)
    north = loaded[0].train.features[:, 0].mean()
    mean, std = _pooled(frames)
    expected = (frames["north"]["income"].mean() - mean[0]) / std[0]
    assert abs(north - expected) < 1e-4 and abs(north) > 0.3


def test_a_site_refuses_federation_scaling_without_the_statistics(tmp_path: Path) -> None:
    _write_sites(tmp_path)
    config = _config(tmp_path, secure=False)

    with pytest.raises(DataError) as error:
        Site("north", tmp_path / "north", config, dataset_info(config)).load()

    assert "site 'north': data.scale is 'federation'" in str(error.value)
    assert "fedpipe stats" in str(error.value)


def test_secure_statistics_of_two_sites_are_refused(tmp_path: Path) -> None:
    _write_sites(tmp_path)
    config = _config(tmp_path, secure=False, sites=("north", "south"))

    with pytest.raises(ConfigError, match="at least 3 sites"):
        statistics_context(config, sites=("north", "south"))


def test_a_given_scaling_is_used_and_checked(tmp_path: Path) -> None:
    _write_sites(tmp_path)
    scaling = {"mean": [1.0, 2.0, 3.0], "std": [1.0, 1.0, 1.0], "rows": 10}
    config = _config(tmp_path, secure=False, scaling=scaling)

    assert with_federation_scaling(config) is config  # given: used as is
    with pytest.raises(ValueError, match=r"data\.scaling has 2 means but the model has 3"):
        _config(tmp_path, secure=False, scaling={**scaling, "mean": [1.0, 2.0], "std": [1, 1]})
    with pytest.raises(ValueError, match=r"data\.scaling is set but data\.scale is 'site'"):
        _config(tmp_path, secure=False, scaling=scaling, scale="site")


def test_fixed_point_digits_sum_exactly_with_negative_and_huge_statistics() -> None:
    a = SiteSums(3.0, np.array([-2.5e9, 1.25]), np.array([7.3e21, 0.5]), np.array([1.0, 2.0]))
    b = SiteSums(5.0, np.array([1.0e9, -4.0]), np.array([2.1e21, 9.0]), np.array([4.0, 1.0]))

    total = from_limb_sums(to_limbs(a) + to_limbs(b), n_features=2, n_classes=2)

    np.testing.assert_allclose(total.vector(), add_sums([a, b]).vector(), rtol=1e-15, atol=2**-23)


def test_a_statistic_too_large_for_the_fixed_point_is_refused_without_its_value() -> None:
    sums = SiteSums(3.0, np.array([1.0]), np.array([3.3e30]), np.array([1.0, 2.0]))

    with pytest.raises(DataError) as error:
        to_limbs(sums, site="east")

    assert "site 'east'" in str(error.value) and "sum of squares of input 0" in str(error.value)
    assert "3.3e+30" not in str(error.value)


def _yaml(tmp_path: Path, config: FederationConfig) -> Path:
    path = tmp_path / "federation.yaml"
    path.write_text(config.model_dump_json(exclude_unset=True))  # JSON is YAML
    return path


@pytest.mark.parametrize("secure", [False, True], ids=["clear", "secure-aggregation"])
def test_fedpipe_stats_prints_the_federation_and_per_site_figures_only_in_the_clear(
    tmp_path: Path, secure: bool
) -> None:
    frames = _write_sites(tmp_path)
    path = _yaml(tmp_path, _config(tmp_path, secure=secure))

    result = runner.invoke(app, ["stats", str(path)], terminal_width=200)

    assert result.exit_code == 0, result.output
    mean, _ = _pooled(frames)
    assert "1560 training rows of 4 sites" in result.output
    assert f"{mean[0]:.6g}" in result.output  # income's federation mean
    assert ("north" in result.output) is not secure
    assert ("per-site figures are not shown" in result.output) is secure


def test_fedpipe_stats_refuses_two_sites_under_secure_aggregation(tmp_path: Path) -> None:
    _write_sites(tmp_path)
    path = _yaml(tmp_path, _config(tmp_path, secure=True))

    result = runner.invoke(
        app, ["stats", str(path), "--site", "north", "--site", "south"], terminal_width=200
    )

    assert result.exit_code == 2 and "at least 3 sites" in result.output
    assert "Traceback" not in result.output


def test_a_run_forms_the_federation_scaling_before_round_1(tmp_path: Path) -> None:
    frames = _write_sites(tmp_path)

    config = checked_before_run(_config(tmp_path, secure=True))

    assert config.data.scaling is not None and config.data.scaling.rows == 1560
    np.testing.assert_allclose(config.data.scaling.mean, _pooled(frames)[0], rtol=1e-9, atol=1e-9)


def test_a_curious_coordinator_reads_no_site_statistics_from_what_the_sites_send(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attacker: a coordinator keeping every message of the statistics stage."""
    from fl_components.data.check import load_configured_site
    from fl_components.data.statistics import site_sums
    from fl_components.secure_aggregation.protocol import MaskedUpdate, SecAggCoordinator

    _write_sites(tmp_path)
    config = _config(tmp_path, secure=True)
    kept: list[bytes] = []
    receive = SecAggCoordinator.receive

    def keep(self: SecAggCoordinator, message: bytes) -> None:
        kept.append(message)
        receive(self, message)

    monkeypatch.setattr(SecAggCoordinator, "receive", keep)

    federation_statistics(config)

    info = dataset_info(config)
    assert len(kept) == len(SIZES)
    for payload in kept:
        message = MaskedUpdate.from_bytes(payload)
        data = load_configured_site(config, message.sender, tmp_path / message.sender, info=info)
        own = to_limbs(site_sums(data.train, n_classes=2))
        # what travels is masked: it matches the site's digits no better than chance
        assert np.mean(message.masked.astype(np.int64) % (1 << 16) == own) < 0.05
        assert np.abs(message.masked.astype(np.float64)).max() > 2**20  # not 16-bit digits


def test_federation_scaling_on_work_pools_needs_a_given_scale(tmp_path: Path) -> None:
    raw = _config(tmp_path, secure=False).model_dump(mode="json", exclude_unset=True)
    raw["backend"] = "work-pool"
    raw["sites"] = [{**s, "work_pool": f"{s['name']}-pool"} for s in raw["sites"]]

    with pytest.raises(ValueError, match=r"give data\.scaling"):
        FederationConfig.model_validate(raw)


def test_the_pinned_scaling_travels_in_a_site_job_and_loads_again(tmp_path: Path) -> None:
    from fl_components.wire.site_job import ModelRef, SiteJobMessage

    _write_sites(tmp_path)
    config = with_federation_scaling(_config(tmp_path, secure=False))
    job = SiteJobMessage(
        federation=config,
        site="north",
        run_id="run-1",
        round=1,
        stage="train",
        model=ModelRef(uri="file:///m", sha256="0" * 64),
    )

    again = SiteJobMessage.model_validate(job.to_parameters()["job"])

    assert again.federation.data.scaling == config.data.scaling


def test_with_unloadable_sites_allowed_the_sites_that_load_form_the_scale(tmp_path: Path) -> None:
    frames = _write_sites(tmp_path)
    (tmp_path / "east" / "train.csv").write_text("income;age;debt;label\n1;2;3;0\n")
    config = _config(tmp_path, secure=True, allow_unloadable_sites=True)

    scaled = with_federation_scaling(config)

    del frames["east"]
    assert scaled.data.scaling is not None
    assert scaled.data.scaling.rows == sum(len(f) for f in frames.values())
    np.testing.assert_allclose(scaled.data.scaling.mean, _pooled(frames)[0], rtol=1e-9, atol=1e-9)


def test_a_categorical_input_is_summarized_as_its_levels_share(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for site in ("a", "b", "c"):
        frame = pd.DataFrame(
            {"income": rng.normal(size=50), "region": rng.choice(["north", "south"], 50)}
        )
        frame["label"] = (frame["income"] > 0).astype(int)
        (tmp_path / site).mkdir()
        frame.to_csv(tmp_path / site / "train.csv", index=False)
        frame.to_csv(tmp_path / site / "test.csv", index=False)
    config = FederationConfig.model_validate(
        {
            "name": "regions",
            "sites": [{"name": s, "data_path": str(tmp_path / s)} for s in "abc"],
            "data": {
                "source": "site_files",
                "columns": ["income", "region"],
                "categorical": {"region": ["north", "south"]},
                "n_classes": 2,
                "scale": "federation",
                "sites_dir": str(tmp_path / "federation"),
            },
            "secure_aggregation": {"enabled": True, "threshold": 3},
        }
    )

    result = federation_statistics(config)

    assert result.inputs == ("income", "region=north", "region=south")
    pooled = pd.concat([pd.read_csv(tmp_path / s / "train.csv") for s in "abc"])
    north = float((pooled["region"] == "north").mean())  # the level's count / rows
    assert result.stats.mean[1] == pytest.approx(north, abs=1e-7)
    assert result.stats.mean[1] + result.stats.mean[2] == pytest.approx(1.0, abs=1e-7)
