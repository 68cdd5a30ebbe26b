"""Run the work-pool backend's site deployments in this process (tests without workers).

:func:`dispatch_in_process` replaces ``tasks.work_pool.run_participant`` with a stand-in
whose ``submit`` runs the participant flow itself, right away, with the site's environment
(its data folder, name and keys) scoped to that one run, exactly as the site's worker
would set it; each call's parameters are recorded.
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
    from fl_components.exchange import SITE_DIR_ENV, SITE_KEYS_ENV, SITE_NAME_ENV
    from fl_components.federation import federation_dir
    from fl_components.wire.site_job import SiteJobMessage
    from flows.participant import federated_participant
    from tasks import work_pool

    calls: list[dict[str, Any]] = []

    class _Deployment:  # what a site's worker would run, here in this process
        @staticmethod
        def submit(message: SiteJobMessage) -> Done:
            cfg, site = message.federation, message.site
            # the message as the flow run's parameters carry it (JSON), and back
            job = SiteJobMessage.model_validate(message.to_parameters()["job"])
            calls.append(job.model_dump())
            env = {SITE_DIR_ENV: str(federation_dir(cfg) / site), SITE_NAME_ENV: site}
            if keys is not None:
                env[SITE_KEYS_ENV] = str(keys[site])
            with monkeypatch.context() as scoped:
                for name, value in env.items():
                    scoped.setenv(name, value)
                return Done(lambda: asyncio.run(federated_participant(job=job)))

    monkeypatch.setattr(work_pool, "run_participant", _Deployment)
    return calls
