"""The flow's task runner from ``runner``: threads by default, Ray or Dask when asked.

The slow tests run the same small federation on the thread runner and on a Ray or Dask
cluster on 127.0.0.1 (started by the test, stopped after it): the seeds fix every site's
training, so the final global model scores the same on both.
"""

from __future__ import annotations

import sys

import pytest
from prefect.task_runners import ThreadPoolTaskRunner

from fl_components.config import FederationConfig, config_from_dict
from fl_components.errors import ConfigError
from flows.runners import SMALL_MODEL_PARAMETERS, model_parameters, task_runner_for


def test_the_default_is_a_thread_pool_sized_by_workers() -> None:
    assert isinstance(task_runner_for(FederationConfig()), ThreadPoolTaskRunner)
    # unset: one thread for a small model (the default digits MLP, 9.1k parameters), whose
    # sites contend for the GIL side by side; Prefect's pool for a large one
    assert task_runner_for(FederationConfig())._max_workers == 1
    large = FederationConfig.model_validate({"model": {"kind": "mlp", "hidden": [1024, 1024]}})
    assert model_parameters(large) > SMALL_MODEL_PARAMETERS
    assert task_runner_for(large)._max_workers == ThreadPoolTaskRunner()._max_workers
    # the work-pool backend's tasks wait on the sites' flow runs: side by side, always
    pools = FederationConfig.model_validate({"backend": "work-pool"})
    assert task_runner_for(pools)._max_workers == ThreadPoolTaskRunner()._max_workers
    runner = task_runner_for(FederationConfig.model_validate({"runner": {"workers": 3}}))
    assert isinstance(runner, ThreadPoolTaskRunner)
    assert runner._max_workers == 3


@pytest.mark.parametrize(
    ("runner", "extra", "names"),
    [
        ({"kind": "thread", "address": "tcp://h:8786"}, {}, "runner.address"),
        ({"kind": "dask", "address": "tcp://h:8786", "workers": 2}, {}, "runner.workers"),
        ({"kind": "ray"}, {"backend": "work-pool"}, "runner.kind is 'ray'"),
    ],
)
def test_settings_that_do_not_fit_are_refused_by_name(
    runner: dict[str, object], extra: dict[str, object], names: str
) -> None:
    with pytest.raises(ConfigError, match=names):
        config_from_dict({"runner": runner, **extra})


def test_a_missing_extra_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prefect_ray", None)  # as if not installed
    config = FederationConfig.model_validate({"runner": {"kind": "ray"}})
    with pytest.raises(ConfigError, match=r"pip install 'fedpipe\[ray\]'"):
        task_runner_for(config)


def _train(config: FederationConfig) -> float:
    from flows.federated_training import federated_training

    flow = federated_training.with_options(task_runner=task_runner_for(config))
    return flow(config).final_accuracy


def _on(small_config: FederationConfig, runner: dict[str, object]) -> FederationConfig:
    raw = small_config.model_dump(mode="json")
    return config_from_dict({**raw, "runner": runner, "name": f"{raw['name']}-{runner['kind']}"})


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_local_dask_cluster_trains_the_same_model_as_threads(small_config) -> None:
    pytest.importorskip("prefect_dask")
    from distributed import LocalCluster

    threads = _train(small_config)
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:
        dask = _train(_on(small_config, {"kind": "dask", "address": cluster.scheduler_address}))
    assert dask == pytest.approx(threads, abs=1e-6)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_local_ray_cluster_trains_the_same_model_as_threads(small_config) -> None:
    pytest.importorskip("prefect_ray")
    import ray

    threads = _train(small_config)
    ray_accuracy = _train(_on(small_config, {"kind": "ray", "workers": 2}))  # starts, stops
    assert not ray.is_initialized()
    assert ray_accuracy == pytest.approx(threads, abs=1e-6)
