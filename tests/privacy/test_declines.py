"""Declined sites count in the federation's epsilon; a round where all decline is recorded."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from fl_components.config import FederationConfig
from fl_components.errors import BudgetExhaustedError
from fl_components.privacy.ledger import PrivacyLedger, SiteBudgetExhausted
from fl_components.privacy.rounds import PrivacyRounds, declined_record
from fl_components.round.types import LocalUpdate, ServerState


def _rounds() -> PrivacyRounds:
    rounds = PrivacyRounds(
        FederationConfig.model_validate(
            {
                "name": "hospitals",
                "sites": [{"name": "h1"}, {"name": "h2"}],
                "privacy": {"mode": "record", "noise_multiplier": 1.1, "max_epsilon": 3.0},
            }
        )
    )
    rounds.bind_run("run-1")
    return rounds


def _update(site: str, epsilon: float) -> LocalUpdate:
    return LocalUpdate(
        site=site,
        round=1,
        delta=[np.zeros(2, dtype=np.float32)],
        num_examples=10,
        train_loss=0.1,
        seconds=0.0,
        extra={
            "epsilon": epsilon,
            "remaining": 3.0 - epsilon,
            "max_epsilon": 3.0,
            "delta": 1e-5,
            "noise_multiplier": 1.1,
            "sample_rate": 0.1,
            "steps": 20.0,
        },
    )


def test_federation_epsilon_is_the_max_over_every_sites_ledger_decliners_included() -> None:
    rounds = _rounds()
    metrics = rounds.metrics(
        ServerState(round=0, parameters=[]), [_update("h1", 2.19)], None, declined={"h2": 2.99}
    )
    # the site that declined had spent 2.99 already: the old max over reporters gave 2.19
    assert metrics["privacy/epsilon"] == pytest.approx(2.99)
    assert metrics["privacy/site/h2/epsilon"] == pytest.approx(2.99)
    assert metrics["privacy/declined"] == 1.0
    assert rounds.federation_epsilon() == pytest.approx(2.99)


def test_every_site_declining_yields_the_metric_and_tags_to_log_before_failing() -> None:
    metrics, tags = declined_record(
        {"h1": "site 'h1' declines: epsilon spent 2.990", "h2": "site 'h2' declines"},
        round_num=1,
    )
    assert metrics == {"privacy/declined": 2.0}
    assert tags["privacy.declined.h1"] == "round 1: site 'h1' declines: epsilon spent 2.990"
    assert set(tags) == {"privacy.declined.h1", "privacy.declined.h2"}


def test_a_decline_carries_the_spent_epsilon_through_pickle(tmp_path) -> None:
    ledger = PrivacyLedger.open(tmp_path, site="h1", accountant="rdp")
    plan = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 50, "delta": 1e-5}
    ledger.record(federation="f", round_num=1, **plan, max_epsilon=None)
    with pytest.raises(BudgetExhaustedError) as caught:
        ledger.check_round(**plan, max_epsilon=ledger.epsilon(1e-5) + 1e-3)
    decline = pickle.loads(pickle.dumps(caught.value))  # as a process pool returns it
    assert isinstance(decline, SiteBudgetExhausted) and decline.site == "h1"
    assert decline.spent == pytest.approx(ledger.epsilon(1e-5))
    assert str(decline) == str(caught.value)


def test_a_decline_keeps_its_kind_and_epsilon_across_the_work_pool_payload() -> None:
    from fl_components.round.types import Dropout, DropoutKind, JobKind, SiteJob, SiteResult
    from fl_components.wire.site_answer import answer_from_payload, answer_payload

    job = SiteJob(site="h2", kind=JobKind.TRAIN, round=3)
    refusal = Dropout("h2", DropoutKind.DECLINED, "site 'h2' declines", epsilon_spent=2.99)
    payload = answer_payload(SiteResult(site="h2", refusal=refusal), job=job)
    back = answer_from_payload(payload, job=job, size=100).refusal
    # typed, not parsed from a wrapped "ParticipantError: ... BudgetExhaustedError" string
    assert back is not None and back.kind is DropoutKind.DECLINED
    assert back.epsilon_spent == pytest.approx(2.99)
