"""The model download delta in the round engine: deltas, fallbacks, exact bytes/down."""

from __future__ import annotations

import numpy as np
import pytest

from fl_components.compression.download import (
    HELD_FILE,
    DownloadKind,
    ModelDownloads,
    full_download_nbytes,
    load_held,
    save_held,
)
from fl_components.config import FederationConfig
from fl_components.federation import materialize_sites, site_folder
from fl_components.parameters import digest, flatten, get_parameters
from fl_components.round.engine import RoundPlan, run_round
from fl_components.round.types import SiteJob
from fl_components.site.jobs import InProcessSites
from fl_components.site.models import build_model
from fl_components.strategies import FedAvg, ServerState


def _with(config: FederationConfig, **sections: dict[str, object]) -> FederationConfig:
    return FederationConfig.model_validate(config.model_dump(exclude_unset=True) | sections)


class Recording:
    """InProcessSites that keeps each dispatch's jobs and answers."""

    def __init__(self, sites: InProcessSites) -> None:
        self.sites = sites
        self.jobs: list[SiteJob] = []
        self.answers: dict = {}

    def __call__(self, jobs):  # type: ignore[no-untyped-def]
        self.jobs = list(jobs)
        self.answers = self.sites(jobs)
        return self.answers


def _plan(round_num: int, selected: tuple[str, ...], downloads: ModelDownloads | None) -> RoundPlan:
    return RoundPlan(
        round=round_num,
        selected=selected,
        seeds=dict.fromkeys(selected, round_num),
        downloads=downloads,
    )


@pytest.fixture()
def federation(small_config: FederationConfig):  # type: ignore[no-untyped-def]
    def make(bits: int | None) -> tuple[FederationConfig, Recording, ServerState, int]:
        config = _with(small_config, compression={"download": "delta", "download_bits": bits})
        materialize_sites(config)
        sites = InProcessSites(config)
        assert sites.downloads is not None
        state = FedAvg().initial_state(
            get_parameters(build_model(config.model, sites.info, seed=0))
        )
        return config, Recording(sites), state, sum(p.size for p in state.parameters)

    return make


@pytest.mark.parametrize("bits", [None, 8])
def test_a_site_that_followed_gets_a_delta_and_rebuilds_the_broadcast(federation, bits) -> None:  # type: ignore[no-untyped-def]
    config, dispatch, state, d = federation(bits)
    downloads = dispatch.sites.downloads
    names = config.site_names
    strategy = FedAvg()

    state, first = run_round(state, _plan(1, names, downloads), dispatch, strategy)
    assert {j.download.kind for j in dispatch.jobs} == {DownloadKind.FULL}  # type: ignore[union-attr]
    assert first.metrics["bytes/down"] == 3 * full_download_nbytes(d)
    assert first.metrics["bytes/down/site/site-0"] == full_download_nbytes(d)

    exact = [p.copy() for p in state.parameters]
    state, second = run_round(state, _plan(2, names, downloads), dispatch, strategy)
    deltas = [j.download for j in dispatch.jobs]
    assert {x.kind for x in deltas} == {DownloadKind.DELTA}  # type: ignore[union-attr]
    assert {a.received for a in dispatch.answers.values()} == {DownloadKind.DELTA}
    broadcast = downloads.broadcast(exact, round=2)
    for site in names:  # each site rebuilt exactly B_2 and trained from it
        assert digest(load_held(site_folder(config, site))) == broadcast.sha  # type: ignore[arg-type]
        assert downloads.holds(site) == broadcast.sha
    # B_2 is the global model within float32 rounding, or within one 8-bit level
    error = np.abs(flatten(broadcast.model) - flatten(exact)).max()
    assert error <= (1e-6 if bits is None else 2 * np.abs(flatten(exact)).max() / 127)
    # bytes/down: exactly the encoded deltas, framing included
    assert second.metrics["bytes/down"] == sum(x.nbytes for x in deltas)  # type: ignore[union-attr]
    assert second.metrics["bytes/down/site/site-1"] == deltas[1].nbytes  # type: ignore[union-attr]
    if bits == 8:  # about a byte per value, against four
        assert second.metrics["bytes/down"] < 0.3 * first.metrics["bytes/down"]


def test_a_site_that_skipped_a_round_gets_the_full_model(federation) -> None:  # type: ignore[no-untyped-def]
    config, dispatch, state, d = federation(8)
    downloads = dispatch.sites.downloads
    strategy = FedAvg()
    state, _ = run_round(state, _plan(1, config.site_names, downloads), dispatch, strategy)
    state, _ = run_round(state, _plan(2, ("site-0", "site-1"), downloads), dispatch, strategy)

    state, report = run_round(state, _plan(3, config.site_names, downloads), dispatch, strategy)

    kinds = {j.site: j.download.kind for j in dispatch.jobs}  # type: ignore[union-attr]
    assert kinds == {
        "site-0": DownloadKind.DELTA,
        "site-1": DownloadKind.DELTA,
        "site-2": DownloadKind.FULL,  # holds B_1, not B_2
    }
    assert report.metrics["bytes/down/site/site-2"] == full_download_nbytes(d)
    assert report.metrics["bytes/down/site/site-0"] < full_download_nbytes(d) / 3
    sha = downloads.holds("site-0")
    assert all(digest(load_held(site_folder(config, s))) == sha for s in config.site_names)  # type: ignore[arg-type]


def test_a_held_model_that_does_not_match_falls_back_to_the_full_model(federation) -> None:  # type: ignore[no-untyped-def]
    config, dispatch, state, d = federation(8)
    downloads = dispatch.sites.downloads
    strategy = FedAvg()
    state, _ = run_round(state, _plan(1, config.site_names, downloads), dispatch, strategy)
    folder = site_folder(config, "site-1")
    held = load_held(folder)
    assert held is not None
    save_held(folder, [p + 1.0 for p in held])  # the site's copy changed behind our back

    state, report = run_round(state, _plan(2, config.site_names, downloads), dispatch, strategy)

    assert all(j.download.kind is DownloadKind.DELTA for j in dispatch.jobs)  # type: ignore[union-attr]
    received = {s: a.received for s, a in dispatch.answers.items()}
    assert received == {
        "site-0": DownloadKind.DELTA,
        "site-1": DownloadKind.FULL,  # it checked the hash, took the full model
        "site-2": DownloadKind.DELTA,
    }
    assert len(report.updates) == 3  # and trained as usual
    assert report.metrics["bytes/down/site/site-1"] == full_download_nbytes(d)
    assert digest(load_held(folder)) == downloads.holds("site-1")  # type: ignore[arg-type]
    assert (
        report.metrics["bytes/down"]
        == full_download_nbytes(d) + 2 * dispatch.jobs[0].download.nbytes
    )  # type: ignore[union-attr]


def test_without_download_delta_every_site_gets_the_float32_model(small_config) -> None:  # type: ignore[no-untyped-def]
    materialize_sites(small_config)
    sites = InProcessSites(small_config)
    assert sites.downloads is None
    strategy = FedAvg()
    state = strategy.initial_state(
        get_parameters(build_model(small_config.model, sites.info, seed=0))
    )
    d = sum(p.size for p in state.parameters)

    _, report = run_round(state, _plan(1, small_config.site_names, None), sites, strategy)

    assert report.metrics["bytes/down"] == 3 * 4 * d
    assert not any((site_folder(small_config, s) / HELD_FILE).exists() for s in ("site-0",))


def test_the_coordinator_keeps_one_broadcast_whatever_the_rounds() -> None:
    downloads = ModelDownloads(bits=8, seed=0)
    rng = np.random.default_rng(0)
    model = [rng.normal(size=(4, 3)).astype(np.float32)]
    first = downloads.broadcast(model, round=1)
    assert downloads.broadcast(model, round=1) is first  # built once per round
    for round_num in range(2, 6):
        model = [model[0] + 0.1]
        downloads.broadcast(model, round=round_num)
        downloads.received("a", downloads.broadcast(model, round=round_num).sha)
    kept = [v for v in vars(downloads).values() if isinstance(v, list | dict)]
    assert kept == [{"a": downloads.holds("a")}]  # one hash per site, no model per site
    assert downloads.for_site("a").kind is DownloadKind.FULL  # holds B_5, not B_4: a new round
    downloads.broadcast([model[0] + 0.1], round=6)
    assert downloads.for_site("a").kind is DownloadKind.DELTA
    assert downloads.for_site("b").kind is DownloadKind.FULL


def test_model_deltas_under_secure_aggregation(small_config: FederationConfig) -> None:
    from fl_components.secure_aggregation import site_stages as secure_round
    from fl_components.secure_aggregation.coordinator import SecureSum

    config = _with(
        small_config,
        secure_aggregation={"enabled": True, "clip_range": 0.5},
        compression={"method": "qsgd", "bits": 8, "download": "delta", "download_bits": 8},
    )
    materialize_sites(config)
    keys = {
        s: secure_round.enroll_site(secure_round.site_keys_dir(site_folder(config, s)))
        for s in config.site_names
    }
    registry = secure_round.publish_public_keys(secure_round.registry_path(config), keys)
    sites = InProcessSites(config)
    strategy = FedAvg()
    state = strategy.initial_state(get_parameters(build_model(config.model, sites.info, seed=0)))
    d = sum(p.size for p in state.parameters)
    names = config.site_names
    reports = []
    for round_num in (1, 2):
        secure = SecureSum.for_round(
            config,
            registry,
            run_id="run-sd",
            round_num=round_num,
            selected=names,
            like=state.parameters,
        )
        plan = RoundPlan(
            round=round_num,
            selected=names,
            seeds=dict.fromkeys(names, round_num),
            secure=secure,
            downloads=sites.downloads,
        )
        state, report = run_round(state, plan, sites, strategy)
        reports.append(report)
    assert reports[1].metrics["secagg/survivors"] == 3.0
    model = [reports[0].metrics[f"bytes/down/site/{s}"] for s in names]
    delta = [reports[1].metrics[f"bytes/down/site/{s}"] for s in names]
    # round 1: full model + unmask request; round 2: 8-bit delta + unmask request
    assert all(full_download_nbytes(d) < m < full_download_nbytes(d) + 3000 for m in model)
    assert all(x < d + 200 + 3000 for x in delta)
