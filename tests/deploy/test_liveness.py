"""A dispatched site's pool must read dead for a grace period before its run is given up:
after a Prefect server restart every worker reads offline until its next heartbeat gets
through (tests/deploy/test_faults.py restarts the server on the real stack)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.work_pool import _dead_site_message, _Liveness


@dataclass
class _Pool:
    is_paused: bool = False
    status: Any = None


@dataclass
class _Client:
    """What `pool_not_serving` asks: a pool, and whether its one worker is online."""

    online: bool = True

    def read_work_pool(self, name: str) -> _Pool:
        return _Pool()

    def read_workers_for_work_pool(self, name: str) -> list[Any]:
        from prefect.client.schemas.objects import WorkerStatus

        status = WorkerStatus.ONLINE if self.online else WorkerStatus.OFFLINE
        return [type("Worker", (), {"status": status})()]


def test_a_pool_is_dead_only_after_reading_so_for_the_grace() -> None:
    client = _Client(online=False)
    liveness = _Liveness("fedpipe-east", grace=30.0)

    assert liveness.dead(client, now=100.0) is None  # first seen offline: not yet
    assert liveness.dead(client, now=120.0) is None
    client.online = True  # its heartbeat got through again (the server was restarted)
    assert liveness.dead(client, now=125.0) is None
    client.online = False
    assert liveness.dead(client, now=127.0) is None  # the grace starts again
    why = liveness.dead(client, now=157.0)
    assert why is not None and "has no live worker" in why


def test_the_dropout_reason_says_whether_the_sites_run_had_started() -> None:
    """A run not yet started cannot start; one the site was running cannot report back (its
    worker stopped, or the site was cut off mid-round, as tests/multihost partitions it)."""
    why = "work pool 'fedpipe-east' has no live worker (pool NOT_READY)"
    pending = _dead_site_message("east", "fedpipe-east", why, waited=40)
    running = _dead_site_message("east", "fedpipe-east", why, waited=40, running=True)

    assert "after 40s of waiting" in pending and "so its flow run cannot start" in pending
    assert "cannot start" not in running and "cannot report back" in running
    assert "fedpipe site restart east" in running
