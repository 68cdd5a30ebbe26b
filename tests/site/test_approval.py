"""The steward's approval gate, played by a coordinator, another site and an editor of files.

Fast: no server. The gate (:class:`fl_components.site.approval.Gate`) acts only on a
decision signed with the site's own key for exactly this run, config, task code and request;
everything else is refused and logged in the site's audit trail.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fl_components.config import FederationConfig
from fl_components.errors import ConfigError
from fl_components.secure_aggregation.protocol.keys import SiteKeys
from fl_components.site.approval import (
    ApprovalDecision,
    ApprovalStore,
    DecisionRefused,
    Gate,
    Verdict,
    config_diff,
    decide,
    sign_decision,
    verify_decision,
)
from fl_components.site.audit import AuditKind, AuditLog
from fl_components.site.policy import SitePolicy, load_policy, policy_path
from fl_components.wire.signing import digest_of

KEY = "ab" * 32
CODE = "cd" * 32


def _config(**privacy: Any) -> FederationConfig:
    return FederationConfig.model_validate(
        {
            "name": "fed",
            "rounds": 3,
            "sites": [{"name": f"site-{c}"} for c in "abc"],
            "privacy": {"mode": "record", "noise_multiplier": 1.1, **privacy},
        }
    )


def _policy(mode: str, timeout: int = 60) -> SitePolicy:
    return SitePolicy.model_validate(
        {
            "federation": "fed",
            "coordinator_key_id": KEY,
            "approval": {"mode": mode, "timeout_seconds": timeout},
        }
    )


@pytest.fixture
def site(tmp_path: Path) -> Path:
    folder = tmp_path / "site-a"
    SiteKeys.generate().save(folder / "keys")
    return folder


def _gate(folder: Path, mode: str = "every_run", timeout: int = 60) -> Gate:
    return Gate(folder, policy=_policy(mode, timeout), site="site-a", keys_dir=folder / "keys")


def _check(gate: Gate, run: str, config: FederationConfig) -> Any:
    return gate.check(
        federation="fed", run_id=run, stage="mask", config_sha256=digest_of(config), task_code=CODE
    )


def _ask(gate: Gate, run: str, config: FederationConfig) -> Any:
    return gate.ask(
        config,
        run_id=run,
        mlflow_run_id="",
        flow_run_id="",
        requested_by=KEY,
        config_sha256=digest_of(config),
        task_code=CODE,
        stage="mask",
        round_num=1,
        projected_epsilon=2.5,
        budget_left=7.0,
    )


def _approval_events(folder: Path) -> list[str]:
    entries = AuditLog.in_folder(folder).entries()  # the chain verified as it is read
    return [e.details["event"] for e in entries if e.kind is AuditKind.APPROVAL]


def test_the_policy_gains_an_approval_setting(tmp_path: Path) -> None:
    assert _policy("never").approval.mode == "never"
    assert SitePolicy(federation="fed", coordinator_key_id=KEY).approval.mode == "never"
    path = policy_path(tmp_path)
    _policy("every_run").save(path)
    assert load_policy(path).approval.mode == "every_run"
    path.write_text(path.read_text().replace("every_run", "sometimes"))
    with pytest.raises(ConfigError, match=r"approval\.mode"):
        load_policy(path)


def test_never_lets_every_job_go(site: Path) -> None:
    assert _check(_gate(site, "never"), "run-1", _config()).go


def test_every_run_waits_and_a_signed_approval_lets_it_go(site: Path) -> None:
    gate, config = _gate(site), _config()
    assert not _check(gate, "run-1", config).go
    request = _ask(gate, "run-1", config)
    assert [r.run_id for r in ApprovalStore(site).pending()] == ["run-1"]
    assert "projected epsilon for the whole run: 2.5" in request.describe()
    assert gate.poll(request, config) is None  # nothing decided yet
    decide(site, "run-1", verdict=Verdict.APPROVED, reason="ok", keys_dir=site / "keys")
    asked = gate.poll(request, config)
    assert asked is not None and asked.go and asked.verdict is Verdict.APPROVED
    assert ApprovalStore(site).pending() == []
    assert _check(gate, "run-1", config).go  # the run's later rounds
    assert not _check(gate, "run-2", config).go  # every_run: the next run asks again
    assert _approval_events(site) == ["requested", "approved"]


def test_a_rejection_declines_the_whole_run_with_its_reason(site: Path) -> None:
    gate, config = _gate(site), _config()
    request = _ask(gate, "run-1", config)
    decide(
        site, "run-1", verdict=Verdict.REJECTED, reason="not this cohort", keys_dir=site / "keys"
    )
    asked = gate.poll(request, config)
    assert asked is not None and not asked.go and asked.reason == "not this cohort"
    later = _check(gate, "run-1", config)
    assert not later.go and later.verdict is Verdict.REJECTED
    assert _approval_events(site) == ["requested", "rejected"]


def test_a_timeout_is_logged_and_gives_the_reason(site: Path) -> None:
    gate, config = _gate(site, timeout=5), _config()
    request = _ask(gate, "run-1", config)
    reason = gate.time_out(request)
    assert "within 5 s" in reason and "approval.timeout_seconds" in reason
    assert ApprovalStore(site).pending() == []
    assert _approval_events(site) == ["requested", "timed_out"]


def test_new_config_lets_a_recurring_run_go_and_asks_for_a_changed_config(site: Path) -> None:
    gate, config = _gate(site, "new_config"), _config()
    request = _ask(gate, "run-1", config)
    decide(site, "run-1", verdict=Verdict.APPROVED, reason="", keys_dir=site / "keys")
    assert gate.poll(request, config) is not None
    recurring = _check(gate, "run-2", config)
    assert recurring.go and recurring.reason == "known config"
    changed = _config(noise_multiplier=0.5)
    assert not _check(gate, "run-3", changed).go
    asked = _ask(gate, "run-3", changed)
    assert asked.previous_config_sha256 == digest_of(config)
    assert asked.config_diff == ("privacy.noise_multiplier: 1.1 -> 0.5",)
    assert _approval_events(site) == ["requested", "approved", "auto_approved", "requested"]


# -- the attacker ---------------------------------------------------------------------------
def _forge(
    site: Path, run: str, request_sha: str, config: FederationConfig, keys: SiteKeys
) -> None:
    decision = ApprovalDecision(
        site="site-a",
        federation="fed",
        run_id=run,
        config_sha256=digest_of(config),
        task_code=CODE,
        request_sha256=request_sha,
        verdict=Verdict.APPROVED,
        decided_at=datetime.now(UTC),
    )
    ApprovalStore(site).write_decision(sign_decision(decision, keys))


@pytest.mark.parametrize("who", ["coordinator", "another site"])
def test_a_decision_signed_by_another_key_is_refused(site: Path, who: str) -> None:
    """The coordinator's key, or site-b's own key, writing into site-a's folder."""
    gate, config = _gate(site), _config()
    request = _ask(gate, "run-1", config)
    _forge(site, "run-1", request.sha256, config, SiteKeys.generate())
    assert gate.poll(request, config) is None  # still waiting
    assert [r.run_id for r in ApprovalStore(site).pending()] == ["run-1"]
    assert list((site / "approvals" / "refused").glob("run-1.*.json"))  # set aside
    entries = [e for e in AuditLog.in_folder(site).entries() if e.kind is AuditKind.APPROVAL]
    assert entries[-1].details["event"] == "refused"
    assert "not this site's own key" in entries[-1].details["detail"]


def test_an_edited_decision_is_refused(site: Path) -> None:
    gate, config = _gate(site), _config()
    request = _ask(gate, "run-1", config)
    decide(site, "run-1", verdict=Verdict.REJECTED, reason="no", keys_dir=site / "keys")
    path = ApprovalStore(site).decision_path("run-1")
    body = json.loads(path.read_text())
    body["decision"]["verdict"] = "approved"  # flipped after signing
    path.write_text(json.dumps(body))
    assert gate.poll(request, config) is None
    assert "edited after signing, or forged" in _last_refusal(site)


def test_a_decision_for_another_run_is_refused(site: Path) -> None:
    gate, config = _gate(site), _config()
    first = _ask(gate, "run-1", config)
    decide(site, "run-1", verdict=Verdict.APPROVED, reason="", keys_dir=site / "keys")
    assert gate.poll(first, config) is not None
    second = _ask(gate, "run-2", config)
    store = ApprovalStore(site)
    store.decision_path("run-2").write_text(store.decision_path("run-1").read_text())
    assert gate.poll(second, config) is None
    assert "for run 'run-1'" in _last_refusal(site)


def test_an_old_approval_replayed_for_a_changed_config_is_refused(site: Path) -> None:
    """every_run: run-1's genuine approval copied over run-1's request for a changed config."""
    gate, config = _gate(site), _config()
    request = _ask(gate, "run-1", config)
    decide(site, "run-1", verdict=Verdict.APPROVED, reason="", keys_dir=site / "keys")
    old = ApprovalStore(site).decision_path("run-1").read_text()
    assert gate.poll(request, config) is not None
    changed = _config(noise_multiplier=0.3)
    assert not _check(gate, "run-1", changed).go  # the run's decision does not cover it
    again = _ask(gate, "run-1", changed)
    ApprovalStore(site).decision_path("run-1").write_text(old)
    assert gate.poll(again, changed) is None
    assert "config hash" in _last_refusal(site)


def test_a_forged_remembered_approval_does_not_let_a_config_through(site: Path) -> None:
    gate, config = _gate(site, "new_config"), _config()
    decision = ApprovalDecision(
        site="site-a",
        federation="fed",
        run_id="old",
        config_sha256=digest_of(config),
        task_code=CODE,
        request_sha256="0" * 64,
        verdict=Verdict.APPROVED,
        decided_at=datetime.now(UTC) - timedelta(days=1),
    )
    ApprovalStore(site).remember(sign_decision(decision, SiteKeys.generate()), config)
    assert not _check(gate, "run-1", config).go


def test_verify_decision_binds_every_field(site: Path) -> None:
    keys = SiteKeys.load(site / "keys")
    decision = ApprovalDecision(
        site="site-a",
        federation="fed",
        run_id="run-1",
        config_sha256="1" * 64,
        task_code=CODE,
        request_sha256="2" * 64,
        verdict=Verdict.APPROVED,
        decided_at=datetime.now(UTC),
    )
    signed = sign_decision(decision, keys)
    expected: dict[str, Any] = {
        "site_public": keys.public().ed25519,
        "site": "site-a",
        "federation": "fed",
        "config_sha256": "1" * 64,
        "task_code": CODE,
        "run_id": "run-1",
        "request_sha256": "2" * 64,
    }
    assert verify_decision(signed, **expected) == decision
    for field, other in [
        ("site", "site-b"),
        ("federation", "other"),
        ("config_sha256", "3" * 64),
        ("task_code", "ef" * 32),
        ("run_id", "run-2"),
        ("request_sha256", "4" * 64),
    ]:
        with pytest.raises(DecisionRefused):
            verify_decision(signed, **{**expected, field: other})


def test_a_run_id_cannot_name_a_path(site: Path) -> None:
    with pytest.raises(ConfigError, match="not a coordinator run id"):
        ApprovalStore(site).decision_path("../../policy")


def test_config_diff_names_each_changed_setting() -> None:
    assert config_diff(None, {"a": 1}) == ()
    assert config_diff({"a": {"b": 1}, "c": 2}, {"a": {"b": 2}, "d": 3}) == (
        "a.b: 1 -> 2",
        'c: 2 -> "(unset)"',
        'd: "(unset)" -> 3',
    )


def _last_refusal(folder: Path) -> str:
    entries = [e for e in AuditLog.in_folder(folder).entries() if e.kind is AuditKind.APPROVAL]
    assert entries[-1].details["event"] == "refused", entries[-1]
    return str(entries[-1].details["detail"])
