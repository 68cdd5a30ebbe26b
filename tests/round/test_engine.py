"""The round engine without Prefect: validation, quorum, typed dropouts, the bare loop."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from fl_components.errors import BudgetExhaustedError
from fl_components.federation import Site, central_test_split, materialize_sites
from fl_components.privacy.accounting import ClientRound
from fl_components.round.engine import (
    EvaluationRequest,
    RoundAbortedError,
    RoundPlan,
    evaluate_sites,
    run_round,
    validate_update,
)
from fl_components.round.types import (
    Dropout,
    DropoutKind,
    JobKind,
    LocalUpdate,
    Metrics,
    SiteJob,
    SiteResult,
)
from fl_components.site.jobs import InProcessSites
from fl_components.strategies import FedAvg, ServerState

MODEL = [np.zeros(2, dtype=np.float32), np.zeros((1, 1), dtype=np.float32)]


def _update(site: str, delta: list[np.ndarray], n: int = 1) -> LocalUpdate:
    return LocalUpdate(site, 1, delta, num_examples=n, train_loss=0.5, seconds=0.0)


class Scripted:
    """A dispatch answering each site with what the test scripted (the engine's edge)."""

    def __init__(self, answers: dict[str, SiteResult | Dropout]) -> None:
        self.answers = answers
        self.jobs: list[SiteJob] = []

    def __call__(self, jobs: Sequence[SiteJob]) -> dict[str, SiteResult | Dropout]:
        self.jobs += jobs
        return {job.site: self.answers[job.site] for job in jobs}


def _plan(*sites: str, minimum: int = 1, **extra: object) -> RoundPlan:
    return RoundPlan(
        round=1, selected=sites, seeds=dict.fromkeys(sites, 0), min_participants=minimum, **extra
    )


def test_invalid_updates_never_reach_the_global_model() -> None:
    good = _update("a", [np.array([1.0, 2.0], np.float32), np.array([[4.0]], np.float32)], n=3)
    nan = _update("b", [np.array([np.nan, 0.0], np.float32), np.zeros((1, 1), np.float32)])
    shape = _update("c", [np.zeros(3, np.float32), np.zeros((1, 1), np.float32)])
    dtype = _update("d", [np.zeros(2, np.float64), np.zeros((1, 1), np.float32)])
    huge = _update("e", [np.array([300.0, 400.0], np.float32), np.zeros((1, 1), np.float32)])
    dispatch = Scripted(
        {u.site: SiteResult(u.site, update=u) for u in (good, nan, shape, dtype, huge)}
    )
    strategy = FedAvg()

    state, report = run_round(
        strategy.initial_state(MODEL), _plan(*"abcde", max_update_norm=100.0), dispatch, strategy
    )

    np.testing.assert_allclose(state.parameters[0], [1.0, 2.0])  # only site a's update
    np.testing.assert_allclose(state.parameters[1], [[4.0]])
    kinds = {d.site: d.kind for d in report.dropouts}
    assert kinds == dict.fromkeys("bcde", DropoutKind.INVALID)
    reasons = {d.site: d.reason for d in report.dropouts}
    assert "NaN" in reasons["b"] and "shape (3,)" in reasons["c"] and "float64" in reasons["d"]
    assert "L2 norm 500" in reasons["e"]
    assert report.metrics["rejected"] == 4.0 and report.metrics["participants"] == 1.0


def test_validate_update_accepts_a_well_formed_update() -> None:
    update = _update("a", [np.ones(2, np.float32), np.ones((1, 1), np.float32)])
    assert validate_update(update, MODEL, max_norm=None) is None


def test_too_few_valid_updates_abort_with_the_evaluation_kept() -> None:
    score = Metrics(loss=0.3, accuracy=0.9, examples=10)
    declined = Dropout("b", DropoutKind.DECLINED, "epsilon 2.99 of 3 spent")
    good = _update("a", [np.ones(2, np.float32), np.ones((1, 1), np.float32)])
    dispatch = Scripted(
        {
            "a": SiteResult("a", update=good, evaluation=score),
            "b": SiteResult("b", evaluation=score, refusal=declined),
        }
    )
    strategy = FedAvg()
    plan = _plan("a", "b", minimum=2, evaluation=EvaluationRequest(0, ("a", "b")))

    with pytest.raises(RoundAbortedError, match="only 1 of 2 sites") as caught:
        run_round(strategy.initial_state(MODEL), plan, dispatch, strategy)

    assert caught.value.evaluations == {"a": score, "b": score}
    assert caught.value.dropouts == [declined]
    assert [j.evaluate_round for j in dispatch.jobs] == [0, 0]  # the evaluation rode along


def test_sites_not_training_get_an_evaluate_job_in_the_same_wave() -> None:
    good = _update("a", [np.ones(2, np.float32), np.ones((1, 1), np.float32)])
    score = Metrics(loss=0.3, accuracy=0.9, examples=10)
    dispatch = Scripted(
        {
            "a": SiteResult("a", update=good, evaluation=score),
            "b": SiteResult("b", evaluation=score),
        }
    )
    strategy = FedAvg()

    _, report = run_round(
        strategy.initial_state(MODEL),
        _plan("a", evaluation=EvaluationRequest(0, ("a", "b"))),
        dispatch,
        strategy,
    )

    assert [(j.site, j.kind, j.round) for j in dispatch.jobs] == [
        ("a", JobKind.TRAIN, 1),
        ("b", JobKind.EVALUATE, 0),
    ]
    assert set(report.evaluations) == {"a", "b"}


def test_server_state_round_trips_without_sharing_arrays() -> None:
    state = ServerState(
        round=4,
        parameters=[np.arange(3, dtype=np.float32)],
        strategy_state={"m": [np.ones(3, dtype=np.float32)]},
        clip_norm=0.7,
        accountant_history=(ClientRound(1.1, 0.3, 4, attempt="k1", round=4),),
        begun_rounds={5: ClientRound(1.1, 0.3, attempt="k2", round=5)},
        rng_state={"bit_generator": "PCG64", "state": {"state": 5, "inc": 7}},
    )

    saved = state.state_dict()
    saved["parameters"][0][0] = 99.0  # a checkpoint's copy is its own
    saved["strategy_state"]["m"][0][0] = 99.0
    restored = ServerState.load_state_dict(state.state_dict())

    assert state.parameters[0][0] == 0.0 and state.strategy_state["m"][0][0] == 1.0
    assert restored.round == 4 and restored.clip_norm == 0.7
    assert restored.accountant_history == (ClientRound(1.1, 0.3, 4),)
    assert [(r.attempt, r.round) for r in restored.accountant_history] == [("k1", 4)]
    assert restored.begun_rounds == {5: ClientRound(1.1, 0.3)}
    assert restored.begun_rounds[5].attempt == "k2"
    assert restored.rng_state == state.rng_state
    np.testing.assert_array_equal(restored.parameters[0], state.parameters[0])
    assert restored.parameters[0] is not state.parameters[0]


def test_bare_loop_over_real_sites_learns(small_config, monkeypatch: pytest.MonkeyPatch) -> None:
    materialize_sites(small_config)
    sites = InProcessSites(small_config)
    strategy = FedAvg()
    from fl_components.parameters import get_parameters
    from fl_components.site.models import build_model
    from fl_components.site.training import evaluate

    model = build_model(small_config.model, sites.info, seed=0)
    state = strategy.initial_state(get_parameters(model))
    test = central_test_split(small_config)
    before = evaluate(model, state.parameters, test).accuracy
    names = small_config.site_names
    for round_num in (1, 2):
        plan = RoundPlan(round=round_num, selected=names, seeds=dict.fromkeys(names, round_num))
        state, report = run_round(state, plan, sites, strategy)
        assert report.metrics["participants"] == 3.0
    after = evaluate(model, state.parameters, test).accuracy

    assert state.round == 2
    assert after > before + 0.3

    def refuse(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise BudgetExhaustedError(f"site {self.name!r}: budget spent")

    monkeypatch.setattr(Site, "train", refuse)
    plan = RoundPlan(round=3, selected=names, seeds=dict.fromkeys(names, 3), min_participants=1)
    with pytest.raises(RoundAbortedError) as caught:
        run_round(state, plan, sites, strategy)
    assert {d.kind for d in caught.value.dropouts} == {DropoutKind.DECLINED}
    scores = evaluate_sites(state.parameters, EvaluationRequest(2, names), sites)
    assert set(scores) == set(names)


def test_simulate_plans_rounds_as_the_flow_does(small_config) -> None:
    from fl_components.round.planning import draw_selection, plain_plan, simulate

    seen: list[int] = []

    state, seconds = simulate(small_config, on_round=lambda r, s: seen.append(s.round))

    assert state.round == small_config.rounds == len(seconds) == 2
    assert seen == [1, 2]
    selected = draw_selection(small_config, round_num=1)
    plan = plain_plan(small_config, round_num=1, selected=selected, evaluation=None)
    assert plan.selected == small_config.site_names  # fraction 1.0
    assert plan.min_participants == 2 and plan.max_update_norm is None


def test_over_selection_closes_the_round_with_the_first_target_updates() -> None:
    """3 selected for 2 needed: c's valid update is surplus (selection order), a's invalid
    one does not count, so b and c make the round."""
    ok = [np.array([1.0, 1.0], np.float32), np.ones((1, 1), np.float32)]
    bad = [np.array([np.nan, 0.0], np.float32), np.zeros((1, 1), np.float32)]
    answers: dict[str, SiteResult | Dropout] = {
        "a": SiteResult("a", update=_update("a", bad)),
        "b": SiteResult("b", update=_update("b", ok)),
        "c": SiteResult("c", update=_update("c", ok)),
        "d": SiteResult("d", update=_update("d", ok)),
    }
    strategy = FedAvg()

    _, report = run_round(
        strategy.initial_state(MODEL), _plan(*"abcd", target=2), Scripted(answers), strategy
    )

    assert sorted(u.site for u in report.updates) == ["b", "c"]
    kinds = {d.site: d.kind for d in report.dropouts}
    assert kinds == {"a": DropoutKind.INVALID, "d": DropoutKind.SURPLUS}
    assert "participation.over_select" in next(d for d in report.dropouts if d.site == "d").reason


def test_over_select_draws_extra_sites_and_plans_the_target(small_config) -> None:
    from fl_components.config import FederationConfig
    from fl_components.errors import ConfigError
    from fl_components.round.planning import draw_selection, plain_plan

    raw = small_config.model_dump(mode="json", exclude_unset=True)
    raw["sites"] = [{"name": f"s{i}"} for i in range(10)]
    raw["participation"] = {"fraction": 0.3, "min_participants": 2, "over_select": 2}
    config = FederationConfig.model_validate(raw)
    selected = draw_selection(config, round_num=1)
    plan = plain_plan(config, round_num=1, selected=selected, evaluation=None)
    assert (len(selected), plan.target) == (5, 3)
    raw["privacy"] = {"mode": "participant"}
    with pytest.raises((ConfigError, ValueError), match="over_select"):
        FederationConfig.model_validate(raw)
