from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_components.errors import BudgetExhaustedError, ConfigError
from fl_components.privacy.ledger import PrivacyLedger, default_delta, epsilon_of


@pytest.mark.parametrize(
    ("rounds", "expected"), [(1, 4.728507067), (10, 19.053597532), (100, 96.116308425)]
)
def test_cross_silo_epsilon_without_sampling(rounds: int, expected: float) -> None:
    # q = 1, z = 1, delta = 1e-5: the trade-off table of the docs
    assert epsilon_of([(1.0, 1.0, rounds)], delta=1e-5, accountant="rdp") == pytest.approx(
        expected, rel=1e-6
    )


def test_default_delta_is_below_one_over_ten_n() -> None:
    assert default_delta(455) == 1e-4
    assert default_delta(100) == 1e-3
    assert default_delta(455) < 1 / (10 * 455)


def test_ledger_survives_restart_and_refuses_the_overspending_round(tmp_path) -> None:
    plan = {"noise_multiplier": 1.1, "sample_rate": 0.05, "steps": 40, "delta": 1e-5}
    ledger = PrivacyLedger.open(tmp_path, site="h1", accountant="rdp")
    ledger.check_round(**plan, max_epsilon=3.0)
    ledger.record(federation="f", round_num=1, **plan, max_epsilon=3.0)
    spent = ledger.epsilon(1e-5)

    reopened = PrivacyLedger.open(tmp_path, site="h1", accountant="rdp")  # a new process

    assert reopened.history == ledger.history
    assert reopened.epsilon(1e-5) == pytest.approx(spent)
    budget = reopened.epsilon_after(**plan) - 1e-3  # just short of one more round
    assert reopened.would_exceed(**plan, max_epsilon=budget)
    with pytest.raises(BudgetExhaustedError, match=r"site 'h1' declines: epsilon spent"):
        reopened.check_round(**plan, max_epsilon=budget)
    assert len(PrivacyLedger.open(tmp_path, site="h1", accountant="rdp").entries) == 1


def test_ledger_kept_with_one_accountant_refuses_another(tmp_path) -> None:
    ledger = PrivacyLedger.open(tmp_path, site="h1", accountant="rdp")
    ledger.record(
        federation="f",
        round_num=1,
        noise_multiplier=1.0,
        sample_rate=0.1,
        steps=10,
        delta=1e-5,
        max_epsilon=None,
    )
    with pytest.raises(ConfigError, match=r"set privacy\.accountant to 'rdp'"):
        PrivacyLedger.open(tmp_path, site="h1", accountant="prv")


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sigma=st.floats(0.5, 3.0),
    sample_rate=st.floats(0.01, 1.0),
    steps=st.integers(1, 200),
    max_epsilon=st.floats(0.5, 20.0),
)
def test_budget_check_never_lets_epsilon_overshoot(
    tmp_path, sigma: float, sample_rate: float, steps: int, max_epsilon: float
) -> None:
    ledger = PrivacyLedger(path=tmp_path / "unused.json", site="s")
    plan = {"noise_multiplier": sigma, "sample_rate": sample_rate, "steps": steps, "delta": 1e-5}
    for round_num in range(1, 8):
        if ledger.would_exceed(**plan, max_epsilon=max_epsilon):
            with pytest.raises(BudgetExhaustedError):
                ledger.check_round(**plan, max_epsilon=max_epsilon)
            break
        ledger.check_round(**plan, max_epsilon=max_epsilon)
        ledger.entries.append(_entry(plan, round_num))
        assert ledger.epsilon(1e-5) <= max_epsilon


def _entry(plan: dict[str, float], round_num: int):  # type: ignore[no-untyped-def]
    from fl_components.privacy.ledger import LedgerEntry

    return LedgerEntry(
        federation="f",
        round=round_num,
        noise_multiplier=plan["noise_multiplier"],
        sample_rate=plan["sample_rate"],
        steps=int(plan["steps"]),
        recorded_at=0.0,
    )
