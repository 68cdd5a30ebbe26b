"""Prefect tasks a site runs for secure aggregation under the local backend.

Each task stands for the site: it reads the site's own folder and keys
(``<site folder>/keys``) and returns only public keys, a masked message or an unmask
response. Task runs are named ``mask-<site>-r<round>`` and ``unmask-<site>-r<round>``.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from fl_components import secure_round
from fl_components.config import FederationConfig
from fl_components.data import DatasetInfo
from fl_components.federation import Site, site_folder
from fl_components.parameters import NDArrays
from fl_components.secagg import PublicKeys, RoundContext


@task(name="enroll", task_run_name="enroll-{site}", cache_policy=NO_CACHE)
def enroll_site(config: FederationConfig, *, site: str) -> PublicKeys:
    """Make the site's keys in its own folder if missing; return its public keys."""
    return secure_round.enroll_site(secure_round.site_keys_dir(site_folder(config, site)))


@task(name="mask", task_run_name="mask-{site}-r{round_num}", cache_policy=NO_CACHE)
def mask_site(
    config: FederationConfig,
    info: DatasetInfo,
    global_parameters: NDArrays,
    ctx: RoundContext,
    *,
    site: str,
    round_num: int,
    seed: int,
) -> secure_round.MaskedContribution:
    """Stage 1 at ``site``: train, weight, mask; return the signed masked message.

    No retries: a retry would train and draw masks (and DP noise) again.
    """
    folder = site_folder(config, site)
    registry = secure_round.load_registry(
        secure_round.registry_path(config), sites=ctx.participants
    )
    return secure_round.mask_at_site(
        Site(name=site, folder=folder, config=config, info=info),
        global_parameters,
        ctx,
        registry=registry,
        keys_dir=secure_round.site_keys_dir(folder),
        seed=seed,
    )


@task(name="unmask", task_run_name="unmask-{site}-r{round_num}", cache_policy=NO_CACHE)
def unmask_site(
    config: FederationConfig, ctx: RoundContext, request: bytes, *, site: str, round_num: int
) -> bytes:
    """Stage 2 at ``site``: answer the unmask request (its memory persists in its folder)."""
    folder = site_folder(config, site)
    registry = secure_round.load_registry(
        secure_round.registry_path(config), sites=ctx.participants
    )
    return secure_round.unmask_at_site(
        site,
        folder,
        ctx,
        request,
        registry=registry,
        keys_dir=secure_round.site_keys_dir(folder),
    )
