"""Prefect tasks a site runs for secure aggregation (local and work-pool backends).

Each task stands for the site: it reads the site's own folder and keys
(``<site folder>/keys``) and returns only public keys, a masked message or an unmask
response. Task runs are named ``mask-<site>-r<round>`` and ``unmask-<site>-r<round>``.
The work-pool participant flow runs the same stages (:func:`site_mask`,
:func:`site_unmask`) on the site's own worker.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from fl_components import secure_round
from fl_components.config import FederationConfig
from fl_components.data import DatasetInfo
from fl_components.errors import ConfigError
from fl_components.exchange import SITE_KEYS_ENV
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


# -- the work-pool backend: the same stages, run by the site's own worker ------------------
def keys_here(site: Site) -> Path:
    """The served site's key folder: ``FEDPIPE_SITE_KEYS``, else ``<site folder>/keys``.

    ``fedpipe site init`` and ``fedpipe up`` start each site's worker with the variable set.
    """
    configured = os.environ.get(SITE_KEYS_ENV)
    return Path(configured) if configured else secure_round.site_keys_dir(site.folder)


@task(name="site_mask", task_run_name="mask-{site.name}-r{round_num}", cache_policy=NO_CACHE)
def site_mask(
    site: Site, global_parameters: NDArrays, ctx: RoundContext, *, round_num: int, seed: int
) -> dict[str, Any]:
    """Stage 1 on the site's worker; returns the JSON-safe masked payload."""
    registry = secure_round.load_registry(
        secure_round.registry_path(site.config), sites=ctx.participants
    )
    contribution = secure_round.mask_at_site(
        site, global_parameters, ctx, registry=registry, keys_dir=keys_here(site), seed=seed
    )
    return contribution.to_payload()


@task(name="site_unmask", task_run_name="unmask-{site.name}-r{round_num}", cache_policy=NO_CACHE)
def site_unmask(site: Site, ctx: RoundContext, request: bytes, *, round_num: int) -> dict[str, Any]:
    """Stage 2 on the site's worker; returns the JSON-safe unmask response."""
    registry = secure_round.load_registry(
        secure_round.registry_path(site.config), sites=ctx.participants
    )
    response = secure_round.unmask_at_site(
        site.name, site.folder, ctx, request, registry=registry, keys_dir=keys_here(site)
    )
    return unmask_payload(response, site=site.name, round_num=round_num)


def unmask_payload(response: bytes, *, site: str, round_num: int) -> dict[str, Any]:
    """An unmask response as a JSON-safe mapping."""
    return {
        "stage": "unmask",
        "site": site,
        "round": round_num,
        "response": base64.b64encode(response).decode("ascii"),
    }


def response_from_payload(payload: dict[str, Any], *, site: str, round_num: int) -> bytes:
    """Inverse of :func:`unmask_payload`, checking stage, site and round."""
    header = {k: payload.get(k) for k in ("stage", "site", "round")}
    if header != {"stage": "unmask", "site": site, "round": round_num}:
        raise ConfigError(
            f"site {site!r} round {round_num}: unmask result header {header} does not match"
        )
    return base64.b64decode(payload["response"], validate=True)
