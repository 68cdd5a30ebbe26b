"""The site steward's approval on the real stack: a run waits, `fedpipe site approve` lets it go.

One coordinator run of one round, every site's policy asking (``approval.mode: every_run``):
north's steward first finds a forged decision written into north's folder and a bare
"Resume" from the shared Prefect API (both refused, the run stays paused), then approves
with ``fedpipe site approve``; south's steward rejects with a reason; east's steward does not
answer before the policy's timeout. Only north trains: south and east are typed ``declined``
dropouts with the reason, and the round goes on without them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.stack_harness import (
    _api_get,
    _api_post,
    _fedpipe,
    deployed_config,
    run_coordinator,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "e2e-approval"
EAST_TIMEOUT = 10


def _folder(stack: dict[str, Any], site: str) -> Path:
    return Path(stack["sites"][site]["data"])


def _events(folder: Path, run_id: str | None = None) -> list[str]:
    from fl_components.site.audit import AuditKind, AuditLog

    return [
        str(e.details["event"])
        for e in AuditLog.in_folder(folder).entries()
        if e.kind is AuditKind.APPROVAL and (run_id is None or e.details.get("run_id") == run_id)
    ]


def _until(what: str, check: Callable[[], Any], stop: threading.Event, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set():
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"gave up waiting for {what}")


def _pending(folder: Path) -> Any:
    from fl_components.site.approval import ApprovalStore

    return next((r for r in ApprovalStore(folder).pending() if r.federation == NAME), None)


def _paused(state: dict[str, Any]) -> dict[str, Any] | None:
    return state if state["type"] == "PAUSED" else None


def _forge(folder: Path, request: Any) -> None:
    """A decision for exactly this request, signed by a key that is not north's own."""
    from fl_components.secure_aggregation.protocol.keys import SiteKeys
    from fl_components.site.approval import ApprovalDecision, ApprovalStore, Verdict, sign_decision

    decision = ApprovalDecision(
        site=request.site,
        federation=request.federation,
        run_id=request.run_id,
        config_sha256=request.config_sha256,
        task_code=request.task_code,
        request_sha256=request.sha256,
        verdict=Verdict.APPROVED,
        decided_at=datetime.now(UTC),
    )
    ApprovalStore(folder).write_decision(sign_decision(decision, SiteKeys.generate()))


def _stewards(stack: dict[str, Any], seen: dict[str, Any]) -> Callable[[threading.Event], None]:
    api, root = stack["prefect_api_url"], stack["root"]
    north, south = _folder(stack, "north"), _folder(stack, "south")

    def act(stop: threading.Event) -> None:
        request = _until("north's request", lambda: _pending(north), stop)
        seen["run_id"] = request.run_id
        # the request is written just before the run pauses: give the pause a moment to land
        state = _until(
            "north's run paused",
            lambda: _paused(_api_get(f"{api}/flow_runs/{request.flow_run_id}").json()["state"]),
            stop,
            timeout=60,
        )
        seen["north_state"], seen["north_message"] = state["type"], state["message"]
        _forge(north, request)
        _until("the forged decision refused", lambda: "refused" in _events(north), stop)
        resumed = _api_post(f"{api}/flow_runs/{request.flow_run_id}/resume", json={})
        seen["bare_resume"] = resumed.status_code
        _until("the bare resume refused", lambda: _events(north).count("refused") >= 2, stop)
        seen["listed"] = _fedpipe(
            "site", "pending", "--site", "north", "--state-dir", root, timeout=60
        )
        approved = _fedpipe(
            "site", "approve", request.run_id, "--site", "north", "--state-dir", root, timeout=60
        )
        assert approved.returncode == 0, approved.stdout + approved.stderr
        signed_at = time.monotonic()
        seen["approved"] = approved.stdout
        _until("north going on", lambda: "approved" in _events(north), stop)
        seen["approve_to_go_s"] = time.monotonic() - signed_at
        _until("south's request", lambda: _pending(south), stop)
        rejected = _fedpipe(
            "site", "reject", request.run_id, "--reason", "not this study",
            "--site", "south", "--state-dir", root, timeout=60,
        )  # fmt: skip
        assert rejected.returncode == 0, rejected.stdout + rejected.stderr

    return act


def _set_policies(stack: dict[str, Any]) -> dict[Path, str]:
    from fl_components.site.policy import policy_path

    saved = {}
    for site, timeout in (("north", 300), ("south", 300), ("east", EAST_TIMEOUT)):
        path = policy_path(_folder(stack, site))
        saved[path] = path.read_text()
        rules = yaml.safe_load(saved[path])
        rules["approval"] = {"mode": "every_run", "timeout_seconds": timeout}
        path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return saved


def test_a_run_waits_for_each_steward_and_only_the_declined_sites_drop(
    stack: dict[str, Any],
) -> None:
    from tests.deploy.test_faults import _in_background

    config = deployed_config(
        stack,
        name=NAME,
        init_from="fresh",
        rounds=1,
        participation={"fraction": 1.0, "min_participants": 1},
        secure_aggregation={"enabled": False},
        tracking={"register_model": False},
        deployment={"timeout_seconds": 240},
    )
    seen: dict[str, Any] = {}
    saved = _set_policies(stack)
    try:
        with _in_background(_stewards(stack, seen)):
            summary = run_coordinator(stack, config)
    finally:
        for path, text in saved.items():
            path.write_text(text)

    run_id = seen["run_id"]
    print(f"north went on {seen['approve_to_go_s']:.2f}s after `fedpipe site approve` returned")
    # north waited visibly, refused the forgery and the bare resume, then went on
    assert seen["north_state"] == "PAUSED", seen
    assert "fedpipe site approve" in seen["north_message"]
    assert seen["bare_resume"] < 300
    assert f"run {run_id}" in seen["listed"].stdout, seen["listed"]
    assert "approved" in seen["approved"]
    assert _events(_folder(stack, "north"), run_id)[:4] == [
        "requested", "refused", "refused", "approved",
    ]  # fmt: skip
    assert _events(_folder(stack, "south"), run_id)[:2] == ["requested", "rejected"]
    assert _events(_folder(stack, "east"), run_id)[:2] == ["requested", "timed_out"]
    # only the declined sites dropped; the round went on
    assert [row["participants"] for row in summary.history] == [1]
    assert [row["dropouts"] for row in summary.history] == [2]
    api = stack["prefect_api_url"]
    artifact = _api_get(f"{api}/artifacts/{NAME}-round/latest").json()["data"]
    south_row = next(line for line in artifact.splitlines() if "| south |" in line)
    assert "declined" in south_row and "not this study" in south_row, south_row
    east_row = next(line for line in artifact.splitlines() if "| east |" in line)
    assert "declined" in east_row and "approval.timeout_seconds" in east_row, east_row
    approvals = _api_get(f"{api}/artifacts/{NAME}-approvals/latest")
    assert approvals.status_code == 200, approvals.text
