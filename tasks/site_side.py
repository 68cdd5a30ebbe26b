"""Prefect tasks a site's own worker runs: train or evaluate on the site's own folder.

The site's folder comes from the worker's environment (``FEDPIPE_SITE_DIR``), set when the
site's worker was started; the coordinator never names it.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from fl_components.config import FederationConfig
from fl_components.errors import ConfigError
from fl_components.exchange import SITE_DIR_ENV, SITE_NAME_ENV
from fl_components.federation import Site, dataset_info
from fl_components.parameters import NDArrays
from fl_components.training import LocalUpdate, Metrics


def this_site(config: FederationConfig, name: str) -> Site:
    """The site this worker serves, from its environment; refuses another site's work.

    Raises
    ------
    ConfigError
        If the worker was started without ``FEDPIPE_SITE_DIR`` or for another site.
    """
    folder = os.environ.get(SITE_DIR_ENV)
    if not folder:
        raise ConfigError(
            f"{SITE_DIR_ENV} is not set in this worker's environment; start the site's worker "
            f"as `{SITE_DIR_ENV}=/path/to/data {SITE_NAME_ENV}={name} prefect worker start "
            f"--pool <site-pool>`"
        )
    served = os.environ.get(SITE_NAME_ENV)
    if served and served != name:
        raise ConfigError(
            f"this worker serves site {served!r} but was sent work for site {name!r}; "
            "check the deployment's work pool (sites[].work_pool)"
        )
    if name not in config.site_names:
        raise ConfigError(f"site {name!r} is not in federation {config.name!r}")
    return Site(name=name, folder=Path(folder), config=config, info=dataset_info(config))


@task(name="site_train", task_run_name="train-{site.name}-r{round_num}", cache_policy=NO_CACHE)
def site_train(
    site: Site, global_parameters: NDArrays, *, round_num: int, seed: int
) -> LocalUpdate:
    """Local training at this site from the verified global parameters."""
    return site.train(global_parameters, round_num=round_num, seed=seed)


@task(
    name="site_evaluate", task_run_name="evaluate-{site.name}-r{round_num}", cache_policy=NO_CACHE
)
def site_evaluate(site: Site, parameters: NDArrays, *, round_num: int) -> Metrics:
    """Score the given parameters on this site's held-out split."""
    return site.evaluate(parameters)
