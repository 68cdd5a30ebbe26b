"""The coordinator flow's task runner, built from the federation config's ``runner`` section.

``thread`` keeps site tasks on this process's threads (Prefect's ThreadPoolTaskRunner);
``ray`` and ``dask`` hand them to prefect-ray's RayTaskRunner or prefect-dask's
DaskTaskRunner, on the cluster at ``runner.address`` or on a local one started for the run
and stopped with it. Apply it with
``federated_training.with_options(task_runner=task_runner_for(config))``.
"""

from __future__ import annotations

from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from fl_components.config import FederationConfig, RunnerConfig
from fl_components.errors import ConfigError
from fl_components.federation import dataset_info
from fl_components.task.loading import resolve_task

# Below this many parameters a site's steps are too short for threads to help: each site's
# round is mostly Python (and torch's dispatch) under the GIL, and sites side by side on
# threads contend for it. Measured (digits MLP, 9.1k parameters, 2 cores): 100 sites took
# 0.52 s a round on one thread against 0.79 s on Prefect's default pool; a 1.1M-parameter
# MLP, whose matrix products run outside the GIL, ran 0.72x the sequential loop's time on it.
SMALL_MODEL_PARAMETERS = 200_000


def task_runner_for(config: FederationConfig) -> TaskRunner[Any]:
    """The task runner ``config.runner`` asks for.

    Raises
    ------
    ConfigError
        If ``runner.kind`` needs an extra that is not installed.
    """
    runner = config.runner
    if runner.kind == "ray":
        return _ray(runner)
    if runner.kind == "dask":
        return _dask(runner)
    return ThreadPoolTaskRunner(max_workers=thread_workers(config))


def thread_workers(config: FederationConfig) -> int | None:
    """The thread pool's size: ``runner.workers``, else 1 or Prefect's default.

    One thread for a small model trained in this process. On the work-pool backend the
    pool's tasks wait for the sites' own flow runs, elsewhere: they must wait side by side,
    whatever the model.
    """
    if config.runner.workers is not None:
        return config.runner.workers
    if config.backend != "local":
        return None
    return 1 if model_parameters(config) < SMALL_MODEL_PARAMETERS else None


def model_parameters(config: FederationConfig) -> int:
    """How many parameters the config's model has.

    When it cannot be built here, a count at the threshold: the run builds it again, and
    says what is wrong.
    """
    try:
        model = resolve_task(config, dataset_info(config)).build_model(config.seed)
    except Exception:  # the run reports it, with the fix; here it only sizes a thread pool
        return SMALL_MODEL_PARAMETERS
    return sum(parameter.numel() for parameter in model.parameters())


def _missing(kind: str, error: ImportError) -> ConfigError:
    return ConfigError(
        f"runner.kind is {kind!r} but prefect-{kind} is not installed ({error}); "
        f"install it with `pip install 'fedpipe[{kind}]'` or set runner.kind: thread"
    )


def _ray(runner: RunnerConfig) -> TaskRunner[Any]:
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as error:
        raise _missing("ray", error) from None
    if runner.address is not None:
        return RayTaskRunner(address=runner.address)
    # a local cluster on this machine only: no dashboard, nothing listening beyond 127.0.0.1
    init: dict[str, Any] = {"include_dashboard": False, "_node_ip_address": "127.0.0.1"}
    if runner.workers is not None:
        init["num_cpus"] = runner.workers
    return RayTaskRunner(init_kwargs=init)


def _dask(runner: RunnerConfig) -> TaskRunner[Any]:
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as error:
        raise _missing("dask", error) from None
    if runner.address is not None:
        return DaskTaskRunner(address=runner.address)
    # worker processes (torch holds the GIL in places), one thread each, on 127.0.0.1 only
    cluster: dict[str, Any] = {
        "processes": True,
        "threads_per_worker": 1,
        "host": "127.0.0.1",
        "dashboard_address": None,
    }
    if runner.workers is not None:
        cluster["n_workers"] = runner.workers
    return DaskTaskRunner(cluster_kwargs=cluster)
