"""A site's ledger charges each release once: a repeated job gets the same update back.

A retried task, a re-delivered participant run or a resumed coordinator re-running a round
from the same model all reach the site as the same job again (same MLflow run, round and
global model). The site returns the update it released for it, unchanged, and its ledger
keeps one entry; it never trains twice for one request. Another run's round, or the same
round asked for from another model, is a new release: trained, and charged again.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from fl_components.config import FederationConfig
from fl_components.federation import Site, dataset_info, materialize_sites, site_folder
from fl_components.parameters import get_parameters
from fl_components.privacy.ledger import PrivacyLedger, RoundAlreadyCharged
from fl_components.privacy.releases import KEPT_PER_RUN, RELEASES_DIR
from fl_components.round.types import DropoutKind, JobKind, SiteJob
from fl_components.site.jobs import run_job
from fl_components.site.models import build_model

PLAN = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 5, "delta": 1e-5}


@pytest.fixture
def site(tmp_path: Path) -> Site:
    config = FederationConfig.model_validate(
        {
            "name": "ledger-fed",
            "sites": [{"name": "h1"}, {"name": "h2"}],
            "data": {"dataset": "digits", "sites_dir": str(tmp_path / "sites")},
            "model": {"kind": "logreg"},
            "training": {"epochs": 1, "batch_size": 32},
            "privacy": {"mode": "record", "noise_multiplier": 1.0, "delta": 1e-5},
            "seed": 3,
        }
    )
    materialize_sites(config)
    info = dataset_info(config)
    return Site(name="h1", folder=site_folder(config, "h1"), config=config, info=info)


def _job(site: Site, *, run: str, round_num: int, flow_run: str = "flow-1") -> SiteJob:
    model = build_model(site.config.model, site.info, seed=site.config.seed)
    return SiteJob(
        site=site.name,
        kind=JobKind.TRAIN,
        round=round_num,
        parameters=get_parameters(model),
        mlflow_run_id=run,
        flow_run_id=flow_run,
    )


def _ledger(site: Site) -> PrivacyLedger:
    return PrivacyLedger.open(site.folder, site=site.name, accountant="rdp")


def test_a_redelivered_job_charges_once_and_returns_the_same_release(site: Site) -> None:
    job = _job(site, run="run-a", round_num=3)
    first = run_job(site, job, keys_dir=site.folder / "keys")
    # the resumed coordinator (another Prefect flow run, same MLflow run) asks again
    again = run_job(site, _job(site, run="run-a", round_num=3, flow_run="flow-2"), keys_dir="k")

    assert first.update is not None and again.update is not None
    for a, b in zip(first.update.delta, again.update.delta, strict=True):
        np.testing.assert_array_equal(a, b)  # unchanged: post-processing, no second release
    assert again.update.extra["epsilon"] == pytest.approx(first.update.extra["epsilon"])
    entries = _ledger(site).entries
    assert [(e.mlflow_run_id, e.round, e.flow_run_id) for e in entries] == [("run-a", 3, "flow-1")]


def test_another_runs_round_is_a_new_release_and_is_charged_again(site: Site) -> None:
    run_job(site, _job(site, run="run-a", round_num=1), keys_dir="k")
    spent_once = _ledger(site).epsilon(1e-5)

    other = run_job(site, _job(site, run="run-b", round_num=1), keys_dir="k")

    assert other.update is not None and other.refusal is None
    ledger = _ledger(site)
    assert [(e.mlflow_run_id, e.round) for e in ledger.entries] == [("run-a", 1), ("run-b", 1)]
    assert ledger.epsilon(1e-5) > spent_once


def test_a_round_asked_for_from_another_model_is_a_new_release_charged_again(
    site: Site,
) -> None:
    # a resumed run whose re-run earlier round came out otherwise (fresh DP-FedAvg noise)
    first = run_job(site, _job(site, run="run-a", round_num=2), keys_dir="k")
    moved = _job(site, run="run-a", round_num=2)
    moved = SiteJob(**{**moved.__dict__, "parameters": [p + 1.0 for p in moved.parameters]})

    answer = run_job(site, moved, keys_dir="k")
    replayed = run_job(site, moved, keys_dir="k")  # ... and that request re-delivered

    assert answer.update is not None and first.update is not None
    assert answer.update.extra["epsilon"] > first.update.extra["epsilon"]
    assert replayed.update is not None
    np.testing.assert_array_equal(replayed.update.delta[0], answer.update.delta[0])
    entries = _ledger(site).entries
    assert [(e.mlflow_run_id, e.round) for e in entries] == [("run-a", 2), ("run-a", 2)]
    assert len({e.parameters_digest for e in entries}) == 2


def test_a_charged_round_whose_release_is_gone_is_declined(site: Site) -> None:
    run_job(site, _job(site, run="run-a", round_num=2), keys_dir="k")
    for kept in (site.folder / RELEASES_DIR).rglob("round-0002-*"):
        kept.unlink()

    answer = run_job(site, _job(site, run="run-a", round_num=2), keys_dir="k")

    assert answer.refusal is not None and answer.refusal.kind is DropoutKind.DECLINED
    assert "keeps no copy of it" in answer.refusal.reason
    assert answer.refusal.epsilon_spent == pytest.approx(_ledger(site).epsilon(1e-5))
    assert len(_ledger(site).entries) == 1


def test_only_the_latest_releases_of_a_run_are_kept(site: Site) -> None:
    for round_num in (1, 2, 3):
        run_job(site, _job(site, run="run-a", round_num=round_num), keys_dir="k")
    kept = sorted(p.name[:10] for p in (site.folder / RELEASES_DIR).rglob("round-*.json"))
    assert len(kept) == KEPT_PER_RUN and kept == ["round-0002", "round-0003"]


def test_two_deliveries_recording_at_once_charge_once(tmp_path: Path) -> None:
    # both opened the ledger before either recorded (two workers given the same job)
    first = PrivacyLedger.open(tmp_path, site="h1", accountant="rdp")
    second = PrivacyLedger.open(tmp_path, site="h1", accountant="rdp")
    key = {"mlflow_run_id": "r", "parameters_digest": "d"}
    first.record(federation="f", round_num=4, **PLAN, max_epsilon=None, **key)

    with pytest.raises(RoundAlreadyCharged, match=r"discarded, not released") as caught:
        second.record(federation="f", round_num=4, **PLAN, max_epsilon=None, **key)

    assert len(PrivacyLedger.open(tmp_path, site="h1", accountant="rdp").entries) == 1
    decline = pickle.loads(pickle.dumps(caught.value))  # across a process pool
    assert isinstance(decline, RoundAlreadyCharged) and decline.site == "h1"


def test_rounds_without_an_mlflow_run_have_no_key_and_are_each_charged(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path, site="h1", accountant="rdp")
    for _ in range(2):  # bare loops (benchmarks) pass no run: nothing to match, charge each
        ledger.record(federation="f", round_num=1, **PLAN, max_epsilon=None)
    assert len(ledger.entries) == 2
