"""The strategies through the real round engine: real sites, and the benchmark's dispatch."""

import numpy as np

from benchmarks.logreg_federation import BenchSites, LocalSetup, accuracy
from benchmarks.robustness_bench import attack
from fl_components.config import StrategyConfig
from fl_components.data.site_files import partition_bundled
from fl_components.federation import central_test_split, materialize_sites
from fl_components.parameters import get_parameters
from fl_components.round.engine import RoundPlan, run_round
from fl_components.site.jobs import InProcessSites
from fl_components.site.models import build_model
from fl_components.site.training import evaluate
from fl_components.strategies import build_strategy


def test_fedadam_and_median_learn_through_the_engine_on_real_sites(small_config) -> None:
    materialize_sites(small_config)
    sites = InProcessSites(small_config)
    test = central_test_split(small_config)
    names = small_config.site_names
    for section in ({"name": "fedadam"}, {"aggregator": "median"}):
        strategy = build_strategy(StrategyConfig(**section), num_sites=len(names))
        model = build_model(small_config.model, sites.info, seed=0)
        state = strategy.initial_state(get_parameters(model))
        before = evaluate(model, state.parameters, test).accuracy
        for round_num in (1, 2):
            plan = RoundPlan(round=round_num, selected=names, seeds=dict.fromkeys(names, 1))
            state, report = run_round(state, plan, sites, strategy)
            assert report.metrics["participants"] == 3.0
        assert evaluate(model, state.parameters, test).accuracy > before + 0.2, section
    assert set(state.strategy_state) == set()  # median on FedAvg keeps no arrays


def _digits(n_sites: int):
    return partition_bundled(
        dataset="digits",
        site_names=tuple(f"site-{i:02d}" for i in range(n_sites)),
        partitioner="dirichlet",
        alpha=1.0,
        shards_per_site=1,
        quantity_sigma=1.0,
        test_fraction=0.2,
        site_test_fraction=0.01,
        seed=0,
    )


def test_scaffold_control_variates_travel_through_the_engine() -> None:
    sites, _ = _digits(4)
    strategy = build_strategy(StrategyConfig(name="scaffold"), num_sites=4)
    dispatch = BenchSites(
        sites,
        setup=LocalSetup(lr=0.05, batch_size=10, epochs=1),
        attack=None,
        rng=np.random.default_rng(0),
    )
    state = strategy.initial_state([np.zeros((10, 64), np.float32), np.zeros(10, np.float32)])
    selected = ("site-00", "site-02")  # |S| = 2 of N = 4
    plan = RoundPlan(round=1, selected=selected, seeds=dict.fromkeys(selected, 3))
    state, report = run_round(state, plan, dispatch, strategy)
    # round 1 starts from c = c_i = 0, so c_i⁺ = (x − y_i)/(K η) = −Δy_i/(K η) and
    # c = (|S|/N) mean(Δc_i) = (2/4) mean(c_i⁺)
    mean_ci = [np.mean([dispatch.controls[s][k] for s in selected], axis=0) for k in range(2)]
    for c, m in zip(state.strategy_state["control"], mean_ci, strict=True):
        np.testing.assert_allclose(c, 0.5 * m, rtol=1e-5, atol=1e-7)
    assert set(dispatch.controls) == set(selected)
    assert report.aggregated.control_delta is not None


def test_attackers_sink_fedavg_but_not_the_trimmed_mean_through_the_engine() -> None:
    sites, test = _digits(10)
    names = tuple(s.name for s in sites)
    finals = {}
    for label, section in {
        "mean": {},
        "trimmed": {"aggregator": "trimmed_mean", "trim_beta": 0.3},
    }.items():
        strategy = build_strategy(StrategyConfig(**section), num_sites=10)
        dispatch = BenchSites(
            sites,
            setup=LocalSetup(lr=0.1, batch_size=10, epochs=2),
            attack=attack("sign_flip_x5"),
            rng=np.random.default_rng(0),
        )
        state = strategy.initial_state([np.zeros((10, 64), np.float32), np.zeros(10, np.float32)])
        for round_num in range(1, 6):
            plan = RoundPlan(round=round_num, selected=names, seeds=dict.fromkeys(names, round_num))
            state, _ = run_round(state, plan, dispatch, strategy)
        finals[label] = accuracy(state.parameters, test)
    # site-00..02 flip and boost their update: the mean walks away (chance is 0.1), the
    # trimmed mean learns
    assert finals["mean"] < 0.25 and finals["trimmed"] > finals["mean"] + 0.2, finals
