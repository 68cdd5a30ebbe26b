"""`fedpipe site pending|approve|reject` as a steward runs them (in-process, no server)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fl_components.config import FederationConfig
from fl_components.secure_aggregation.protocol.keys import SiteKeys
from fl_components.site.approval import ApprovalStore, Gate, Verdict
from fl_components.site.policy import SitePolicy
from fl_components.wire.signing import digest_of
from ops.cli.main import app

KEY = "ab" * 32
CODE = "cd" * 32


@pytest.fixture
def waiting(tmp_path: Path) -> tuple[Path, Gate, object]:
    folder = tmp_path / "site-a"
    SiteKeys.generate().save(folder / "keys")
    policy = SitePolicy.model_validate(
        {"federation": "fed", "coordinator_key_id": KEY, "approval": {"mode": "every_run"}}
    )
    gate = Gate(folder, policy=policy, site="site-a", keys_dir=folder / "keys")
    config = FederationConfig.model_validate(
        {"name": "fed", "rounds": 2, "sites": [{"name": f"site-{c}"} for c in "abc"]}
    )
    request = gate.ask(
        config,
        run_id="run-1",
        mlflow_run_id="",
        flow_run_id="",
        requested_by=KEY,
        config_sha256=digest_of(config),
        task_code=CODE,
        stage="train",
        round_num=1,
        projected_epsilon=None,
        budget_left=None,
    )
    return folder, gate, (request, config)


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.output


def test_pending_then_approve(waiting: tuple[Path, Gate, object]) -> None:
    folder, gate, (request, config) = waiting  # type: ignore[misc]
    code, out = _invoke("site", "pending", "--folder", str(folder))
    assert code == 0 and "run run-1" in out and "fedpipe site approve run-1" in out, out
    code, out = _invoke("site", "approve", "run-1", "--folder", str(folder))
    assert code == 0 and "approved run run-1" in out, out
    asked = gate.poll(request, config)
    assert asked is not None and asked.verdict is Verdict.APPROVED
    code, out = _invoke("site", "pending", "--folder", str(folder))
    assert code == 0 and "no run waits" in out


def test_reject_needs_a_reason_and_signs_it(waiting: tuple[Path, Gate, object]) -> None:
    folder, gate, (request, config) = waiting  # type: ignore[misc]
    code, _ = _invoke("site", "reject", "run-1", "--folder", str(folder))
    assert code == 2
    code, out = _invoke(
        "site", "reject", "run-1", "--reason", "wrong cohort", "--folder", str(folder)
    )
    assert code == 0 and "rejected" in out, out
    asked = gate.poll(request, config)
    assert asked is not None and asked.reason == "wrong cohort"


@pytest.mark.parametrize(
    ("run", "keys", "expected"),
    [
        ("run-9", None, "no approval request of run 'run-9' is pending"),
        ("../policy", None, "is not a coordinator run id"),
        ("run-1", "nowhere", "the site's key in"),
    ],
)
def test_mistakes_are_one_clear_line(
    waiting: tuple[Path, Gate, object], run: str, keys: str | None, expected: str
) -> None:
    folder = waiting[0]
    extra = ["--keys", str(folder / keys)] if keys else []
    code, out = _invoke("site", "approve", run, "--folder", str(folder), *extra)
    assert code == 2 and expected in out and "Traceback" not in out, out
    assert ApprovalStore(folder).read_decision("run-1") is None
