"""Server rules: first steps by hand, and new states that share nothing with the old."""

import numpy as np
import pytest

from fl_components.errors import RoundError
from fl_components.round.types import LocalUpdate
from fl_components.strategies import (
    AggregatedUpdate,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    QFedAvg,
    Scaffold,
    ServerState,
    SiteInstructions,
    Strategy,
    UpdateAggregation,
)
from fl_components.strategies.qfedavg import qfedavg_step


def arr(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def update(
    site: str,
    *values: float,
    n: int = 1,
    control=None,
    loss=None,
) -> LocalUpdate:
    return LocalUpdate(
        site=site,
        round=1,
        delta=[arr(*values)],
        num_examples=n,
        train_loss=0.0,
        seconds=0.0,
        control_delta=control,
        initial_loss=loss,
    )


def combined(*values: float, participants: int = 1, control=None) -> AggregatedUpdate:
    return AggregatedUpdate(delta=[arr(*values)], participants=participants, control_delta=control)


def test_fedavgm_accumulates_momentum() -> None:
    # beta = 0.5: round 1 v = 2, θ = 0 + 2; round 2 v = 0.5*2 + 1 = 2, θ = 4
    rule = FedAvgM(server_lr=1.0, server_momentum=0.5)
    state = rule.initial_state([arr(0.0)])
    state = rule.apply(state, combined(2.0))
    np.testing.assert_allclose(state.parameters[0], [2.0])
    state = rule.apply(state, combined(1.0))
    np.testing.assert_allclose(state.strategy_state["momentum"][0], [2.0])
    np.testing.assert_allclose(state.parameters[0], [4.0])
    assert state.round == 2


def test_fedprox_sends_mu_and_averages_like_fedavg() -> None:
    rule = FedProx(proximal_mu=0.3)
    state = rule.initial_state([arr(0.0, 0.0)])
    assert rule.configure(1, state, ["a", "b"]) == {
        "a": SiteInstructions(proximal_mu=0.3),
        "b": SiteInstructions(proximal_mu=0.3),
    }
    # (1*[1, 2] + 3*[5, -2]) / 4 = [4, -1]
    agg = rule.aggregate([update("a", 1, 2, n=1), update("b", 5, -2, n=3)], state)
    np.testing.assert_allclose(agg.delta[0], [4.0, -1.0])
    assert rule.params()["strategy.proximal_mu"] == "0.3"


# Reddi et al. 2021, Algorithm 2, one step from θ = 0, m = 0, v = τ² = 0.01,
# with η = 0.1, β1 = 0.9, β2 = 0.99, τ = 0.1 and Δ = [1, -0.5]: m = (1 - β1) Δ = [0.1, -0.05]
#   FedAdam:    v = 0.99*0.01 + 0.01*Δ²  = [0.0199, 0.0124]
#   FedYogi:    v = 0.01 - 0.01*Δ²*sign(0.01 - Δ²) = 0.01 + 0.01*Δ² = [0.02, 0.0125]
#   FedAdagrad: v = 0.01 + Δ² = [1.01, 0.26]
#   θ = η m / (√v + τ)
@pytest.mark.parametrize(
    ("rule_class", "v"),
    [(FedAdam, [0.0199, 0.0124]), (FedYogi, [0.02, 0.0125]), (FedAdagrad, [1.01, 0.26])],
)
def test_fedopt_first_step_by_hand(rule_class, v) -> None:
    rule = rule_class(server_lr=0.1, beta1=0.9, beta2=0.99, tau=0.1)
    state = rule.initial_state([arr(0.0, 0.0)])
    np.testing.assert_allclose(state.strategy_state["v"][0], [0.01, 0.01])
    new = rule.apply(state, combined(1.0, -0.5))
    np.testing.assert_allclose(new.strategy_state["m"][0], [0.1, -0.05], rtol=1e-6)
    np.testing.assert_allclose(new.strategy_state["v"][0], v, rtol=1e-6)
    expected = [0.1 * 0.1 / (np.sqrt(v[0]) + 0.1), 0.1 * -0.05 / (np.sqrt(v[1]) + 0.1)]
    np.testing.assert_allclose(new.parameters[0], expected, rtol=1e-5)


def test_fedadam_first_step_numbers() -> None:
    # the same step as figures: 0.01 / (0.141067 + 0.1) = 0.041482; -0.005 / 0.211355 = -0.023657
    rule = FedAdam(server_lr=0.1, beta1=0.9, beta2=0.99, tau=0.1)
    new = rule.apply(rule.initial_state([arr(0.0, 0.0)]), combined(1.0, -0.5))
    np.testing.assert_allclose(new.parameters[0], [0.041482, -0.023657], atol=1e-6)


def test_fedyogi_second_step_shrinks_v_when_v_exceeds_delta_squared() -> None:
    # after step 1 v = 0.02 (Δ = 1); Δ = 0.1: v > Δ² = 0.01 -> v = 0.02 - 0.01*0.01 = 0.0199
    # (FedAdam would give 0.99*0.0199 + 0.01*0.01 = 0.019801)
    yogi = FedYogi(server_lr=0.1, beta1=0.9, beta2=0.99, tau=0.1)
    state = yogi.apply(yogi.initial_state([arr(0.0)]), combined(1.0))
    state = yogi.apply(state, combined(0.1))
    np.testing.assert_allclose(state.strategy_state["v"][0], [0.0199], rtol=1e-6)


def test_scaffold_configure_aggregate_apply_by_hand() -> None:
    rule = Scaffold(num_sites=4, server_lr=1.0)
    state = rule.initial_state([arr(0.0)])
    state = state.evolve(strategy_state={"control": [arr(1.0)]})
    sent = rule.configure(1, state, ["a"])["a"].server_control
    np.testing.assert_allclose(sent[0], [1.0])
    assert not np.shares_memory(sent[0], state.strategy_state["control"][0])
    updates = [update("a", 1.0, n=1, control=[arr(2.0)]), update("b", 3.0, n=3, control=[arr(4.0)])]
    agg = rule.aggregate(updates, state)
    # Δx̄ = (1*1 + 3*3)/4 = 2.5 (example-weighted); Δc̄ = (2 + 4)/2 = 3 (uniform)
    np.testing.assert_allclose(agg.delta[0], [2.5])
    np.testing.assert_allclose(agg.control_delta[0], [3.0])
    new = rule.apply(state, agg)
    # c ← 1 + (|S|/N) 3 = 1 + (2/4) 3 = 2.5; x ← 0 + 2.5
    np.testing.assert_allclose(new.strategy_state["control"][0], [2.5])
    np.testing.assert_allclose(new.parameters[0], [2.5])


def test_scaffold_refuses_updates_without_control_delta() -> None:
    rule = Scaffold(num_sites=2)
    state = rule.initial_state([arr(0.0)])
    with pytest.raises(RoundError, match=r"site.s. b returned no control_delta"):
        rule.aggregate([update("a", 1.0, control=[arr(0.0)]), update("b", 1.0)], state)
    with pytest.raises(RoundError, match="no control_delta"):
        rule.apply(state, combined(1.0))


def test_qfedavg_step_by_hand() -> None:
    # q = 1, L = 10: Δw = -L δ: -1, 2; Δ' = F Δw: -1, 4 (sum 3);
    # h = q F^0 Δw² + L F: 1 + 10 = 11, 4 + 20 = 24 (sum 35); step = -3/35
    step = qfedavg_step([[arr(0.1)], [arr(-0.2)]], [1.0, 2.0], q=1.0, lipschitz=10.0)
    np.testing.assert_allclose(step[0], [-3 / 35], rtol=1e-5)
    # q = 0 is the uniform mean of the deltas: (0.1 - 0.2)/2
    step0 = qfedavg_step([[arr(0.1)], [arr(-0.2)]], [1.0, 2.0], q=0.0, lipschitz=10.0)
    np.testing.assert_allclose(step0[0], [-0.05], rtol=1e-5)


def test_qfedavg_asks_for_losses_and_refuses_missing_ones() -> None:
    rule = QFedAvg(q=1.0, lipschitz=10.0)
    state = rule.initial_state([arr(0.0)])
    assert rule.configure(1, state, ["a"])["a"].report_initial_loss
    assert rule.needs_individual_updates
    agg = rule.aggregate([update("a", 0.1, loss=1.0), update("b", -0.2, loss=2.0)], state)
    np.testing.assert_allclose(rule.apply(state, agg).parameters[0], [-3 / 35], rtol=1e-5)
    with pytest.raises(RoundError, match=r"site.s. b reported no initial_loss"):
        rule.aggregate([update("a", 0.1, loss=1.0), update("b", 0.1)], state)


def test_robust_aggregation_makes_any_rule_need_clear_updates() -> None:
    rule = FedAvgM(aggregation=UpdateAggregation(rule="median"))
    assert rule.needs_individual_updates and not FedAvgM().needs_individual_updates
    state = rule.initial_state([arr(0.0)])
    agg = rule.aggregate([update("a", 1.0), update("b", 2.0), update("c", 100.0)], state)
    np.testing.assert_allclose(agg.delta[0], [2.0])


RULES: list[Strategy] = [
    FedAvg(),
    FedAvgM(),
    FedProx(),
    Scaffold(num_sites=2),
    FedAdagrad(),
    FedAdam(),
    FedYogi(),
    QFedAvg(lipschitz=10.0),
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_rules_return_new_states_sharing_no_array(rule: Strategy) -> None:
    state = rule.initial_state([arr(1.0, 2.0), arr(3.0)])
    state = state.evolve(
        rng_state={"state": {"key": 1}},
        strategy_state={**state.strategy_state, "other": [arr(7.0)]},
    )
    before = state.state_dict()
    updates = [
        LocalUpdate(
            site=s,
            round=1,
            delta=[arr(0.5, -0.5), arr(1.0)],
            num_examples=2,
            train_loss=0.0,
            seconds=0.0,
            control_delta=[arr(0.1, 0.1), arr(0.2)],
            initial_loss=1.0,
        )
        for s in ("a", "b")
    ]
    agg = rule.aggregate(updates, state)
    new = rule.apply(state, agg)
    assert new.round == state.round + 1
    old_arrays = [*state.parameters, *(a for v in state.strategy_state.values() for a in v)]
    new_arrays = [*new.parameters, *(a for v in new.strategy_state.values() for a in v)]
    for a in [*new_arrays, *agg.delta]:
        assert not any(np.shares_memory(a, b) for b in old_arrays)
    assert new.rng_state is not state.rng_state
    after = state.state_dict()  # the input state is unchanged
    for x, y in zip(before["parameters"], after["parameters"], strict=True):
        np.testing.assert_array_equal(x, y)
    for name in before["strategy_state"]:
        for x, y in zip(before["strategy_state"][name], after["strategy_state"][name], strict=True):
            np.testing.assert_array_equal(x, y)
    restored = ServerState.load_state_dict(new.state_dict())
    np.testing.assert_array_equal(restored.parameters[0], new.parameters[0])
    assert rule.params()["strategy.rule"] == rule.name
