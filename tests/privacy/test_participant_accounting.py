"""Participant-level accounting: q from the selection (Poisson), never from who answered."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from fl_components.config import FederationConfig
from fl_components.federation import select_participants
from fl_components.privacy.accounting import ClientRound, participant_epsilon
from fl_components.privacy.dp_fedavg import SecureRandom, dp_fedavg_aggregate
from fl_components.privacy.ledger import RDP_ORDERS
from fl_components.privacy.participant_round import private_mean
from fl_components.privacy.rounds import PrivacyRounds
from fl_components.round.types import LocalUpdate, ServerState

EMPTY = ServerState(round=0, parameters=[])


def _config(*, sites: int, fraction: float, sampling: str = "random") -> FederationConfig:
    return FederationConfig.model_validate(
        {
            "name": "clinics",
            "rounds": 30,
            "sites": [{"name": f"s{i:02d}"} for i in range(sites)],
            "participation": {"fraction": fraction, "min_participants": 1},
            "privacy": {
                "mode": "participant",
                "client_noise_multiplier": 1.0,
                "delta": 1e-3,
                "sampling": sampling,
            },
        }
    )


def _update(site: str, round_num: int) -> LocalUpdate:
    return LocalUpdate(
        site=site,
        round=round_num,
        delta=[np.ones(3, dtype=np.float32)],
        num_examples=10,
        train_loss=0.5,
        seconds=0.0,
    )


def test_a_third_of_each_cohort_dropping_is_accounted_with_the_selection() -> None:
    # the case: 30 sites, q = 0.3, a third of each cohort drops, z = 1, delta 1e-3
    config = _config(sites=30, fraction=0.3)
    rounds = PrivacyRounds(config)
    state = EMPTY
    logged: list[dict[str, float]] = []
    for round_num in range(1, 31):
        selected = select_participants(
            config.site_names, fraction=0.3, minimum=1, round_num=round_num, seed=0, secret=True
        )
        survivors = [_update(s, round_num) for s in selected[len(selected) // 3 :]]
        result = (
            private_mean(config, survivors, clip_norm=config.privacy.clip_norm, rng=rounds.rng)
            if survivors
            else None
        )
        state, _ = rounds.account(state, result, selected=selected, round_num=round_num)
        logged.append(rounds.metrics(state, survivors, result, declined={}))
    epsilon = logged[-1]["privacy/client_epsilon"]
    # the old survivors-based q (6 of 30 for 9 selected, 3 dropped) reported 6.34
    assert epsilon == pytest.approx(9.5443, abs=1e-3)
    assert epsilon != pytest.approx(6.34, abs=0.01)
    # an auditor recomputes from the logged per-round q and the logged z alone
    accountant = RDPAccountant()
    for row in logged:
        accountant.step(noise_multiplier=1.0, sample_rate=row["privacy/client_sample_rate"])
    assert accountant.get_epsilon(delta=1e-3, alphas=list(RDP_ORDERS)) == pytest.approx(
        epsilon, rel=1e-9
    )


def test_poisson_selection_draws_each_site_independently_with_q() -> None:
    names = tuple(f"s{i}" for i in range(10))
    sizes, included = Counter(), Counter()
    for round_num in range(2000):
        cohort = select_participants(
            names, fraction=0.3, minimum=3, round_num=round_num, seed=0, secret=True
        )
        sizes[len(cohort)] += 1
        included.update(cohort)
    # fixed-size selection always drew ceil(0.3 * 10) = 3; Poisson sizes vary, can be 0
    assert sizes[0] > 0 and len(sizes) > 4
    assert all(abs(included[n] / 2000 - 0.3) < 0.05 for n in names)


def test_reproducible_selection_is_unchanged_without_secret() -> None:
    names = tuple(f"s{i}" for i in range(10))
    first = select_participants(names, fraction=0.3, minimum=2, round_num=4, seed=9)
    assert first == select_participants(names, fraction=0.3, minimum=2, round_num=4, seed=9)
    assert len(first) == 3


def test_poisson_dp_fedavg_divides_by_the_fixed_denominator() -> None:
    updates = [[np.array([1.0])], [np.array([3.0])]]
    rng = SecureRandom(bytes(32))
    # q N = 0.5 * 8 = 4 (McMahan et al. f~_f): (1 + 3) / 4, noise std 0 to pin the value
    fixed = dp_fedavg_aggregate(
        updates, clip_norm=10.0, noise_multiplier=0.0, rng=rng, denominator=4.0
    )
    counted = dp_fedavg_aggregate(updates, clip_norm=10.0, noise_multiplier=0.0, rng=rng)
    assert fixed.mean_update[0][0] == pytest.approx(1.0)
    assert counted.mean_update[0][0] == pytest.approx(2.0)
    assert PrivacyRounds(_config(sites=8, fraction=0.5)).denominator == pytest.approx(4.0)
    assert PrivacyRounds(_config(sites=8, fraction=0.5, sampling="fixed")).denominator is None


def test_an_empty_cohort_is_skipped_but_still_accounted() -> None:
    rounds = PrivacyRounds(_config(sites=10, fraction=0.2))
    assert rounds.cohort_too_small(())
    state, _ = rounds.account(EMPTY, None, selected=(), round_num=1)
    metrics = rounds.metrics(state, [], None, declined={})
    expected = participant_epsilon([ClientRound(1.0, 0.2)], delta=1e-3, accountant="rdp")
    assert metrics["privacy/client_epsilon"] == pytest.approx(expected) and expected > 0
    assert metrics["privacy/client_sample_rate"] == 0.2


def test_fixed_selection_counts_rounds_a_site_was_selected_in_not_answered() -> None:
    rounds = PrivacyRounds(_config(sites=3, fraction=1.0, sampling="fixed"))
    state = EMPTY
    for round_num in (1, 2):
        # s00 is selected twice but answers once: it is at risk in both rounds
        state, _ = rounds.account(state, None, selected=("s00", "s01"), round_num=round_num)
    two_rounds = participant_epsilon([ClientRound(1.0, 1.0, 2)], delta=1e-3, accountant="rdp")
    accountant = rounds.accountant(state)
    assert accountant is not None
    assert accountant.epsilon(1e-3) == pytest.approx(two_rounds, rel=1e-12)


def test_mixed_rounds_take_the_worst_site() -> None:
    sampled = ClientRound(1.0, 0.5, 3)
    fixed_a, fixed_b = ClientRound(1.0, 1.0, 1, ("a",)), ClientRound(1.0, 1.0, 2, ("b",))
    worst = participant_epsilon([sampled, fixed_a, fixed_b], delta=1e-5, accountant="rdp")
    b_alone = participant_epsilon([sampled, fixed_b], delta=1e-5, accountant="rdp")
    assert worst == pytest.approx(b_alone, rel=1e-12)
