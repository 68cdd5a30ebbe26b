"""Run the work-pool backend's site deployments in this process (tests without workers).

:func:`dispatch_in_process` replaces ``tasks.work_pool.run_participant`` with a stand-in
whose ``submit`` runs the participant flow itself, right away, with the site's environment
(its data folder, name and keys) scoped to that one run, exactly as the site's worker
would set it; each call's message is recorded. The coordinator gets an identity in a
temporary key folder, and each site is enrolled as ``fedpipe up`` enrols it (coordinator
key pinned, exchange folder and registry recorded, its public keys in the registry, a
policy written from the federation's settings) the first time a job reaches it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest


class Done:
    """A finished future holding a result or an error."""

    def __init__(self, call: Callable[[], Any]) -> None:
        try:
            self._value, self._error = call(), None
        except Exception as error:
            self._value, self._error = None, error

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value


def dispatch_in_process(
    monkeypatch: pytest.MonkeyPatch, *, keys: Mapping[str, Path] | None = None
) -> list[dict[str, Any]]:
    """Patch the backend's dispatch; return the list each call's parameters go to."""
    import tempfile

    from fl_components.exchange import SITE_DIR_ENV, SITE_KEYS_ENV, SITE_NAME_ENV
    from fl_components.federation import federation_dir
    from fl_components.secure_aggregation import site_stages
    from fl_components.site.enrolment import enrol, enrolment_path
    from fl_components.site.policy import policy_from_federation, policy_path
    from fl_components.wire.signing import COORDINATOR_KEYS_ENV, CoordinatorIdentity
    from flows.participant import federated_participant
    from tasks import work_pool

    calls: list[dict[str, Any]] = []
    coordinator_keys = Path(tempfile.mkdtemp(prefix="fedpipe-test-coordinator-")) / "keys"
    identity = CoordinatorIdentity.create(coordinator_keys)
    monkeypatch.setenv(COORDINATOR_KEYS_ENV, str(coordinator_keys))

    def enrolled(cfg: Any, site: str, folder: Path, site_keys: Path) -> None:
        if enrolment_path(folder).is_file():
            return
        registry = site_stages.registry_path(cfg)
        public = site_stages.enroll_site(site_keys)
        site_stages.publish_public_keys(registry, {site: public})
        enrol(
            folder,
            federation=cfg.name,
            site=site,
            coordinator=identity.public,
            exchange_dir=cfg.deployment.exchange_dir,
            registry=registry,
        )
        if not policy_path(folder).is_file():
            policy = policy_from_federation(cfg, coordinator_key_id=identity.key_id)
            policy.save(policy_path(folder))

    class _Deployment:  # what a site's worker would run, here in this process
        @staticmethod
        def submit(signed: Any) -> Done:
            cfg, site = signed.message.federation, signed.message.site
            # the signed job as the flow run's parameters carry it (JSON), and back
            job = work_pool.SignedSiteJob.model_validate(work_pool.signed_parameters(signed)["job"])
            calls.append(job.message.model_dump())
            folder = federation_dir(cfg) / site
            site_keys = keys[site] if keys is not None else folder / "keys"
            enrolled(cfg, site, folder, site_keys)
            env = {SITE_DIR_ENV: str(folder), SITE_NAME_ENV: site}
            if keys is not None:
                env[SITE_KEYS_ENV] = str(keys[site])
            with monkeypatch.context() as scoped:
                for name, value in env.items():
                    scoped.setenv(name, value)
                return Done(lambda: asyncio.run(federated_participant(job=job)))

    monkeypatch.setattr(work_pool, "run_participant", _Deployment)
    return calls
