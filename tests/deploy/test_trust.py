"""The site decides what runs on its data, played on the real stack by a party with API access.

The attacker holds what every site's worker holds (the Prefect API, read access to result
storage and the exchange folder) and creates flow runs directly on a site's participant
deployment, or deployments of its own on the site's pool. Each test checks what the site
did: the run's stored answer is a typed ``rejected`` refusal (sealed to the coordinator),
the site's audit log names the reason, and nothing ran on its data. Jobs "signed by the
coordinator" here use the stack's coordinator key from its state folder, as a compromised
or buggy coordinator would; the site's own policy still refuses what it does not allow.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.stack_harness import (
    SITES,
    _api_get,
    _api_post,
    _wait_flow_run,
    deployed_config,
    job_message,
    participant_runs,
    run_coordinator,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _state(stack: dict[str, Any]) -> Path:
    return Path(stack["root"])


def _identity(stack: dict[str, Any]) -> Any:
    from fl_components.wire.signing import COORDINATOR_KEYS_DIR, CoordinatorIdentity

    return CoordinatorIdentity.load(_state(stack) / COORDINATOR_KEYS_DIR)


def _folder(stack: dict[str, Any], site: str) -> Path:
    return Path(stack["sites"][site]["data"])


def _message(stack: dict[str, Any], site: str, **changes: Any) -> Any:
    """A well-formed train job for ``site`` with a model in the stack's exchange folder."""
    from fl_components.exchange import write_global_model
    from fl_components.federation import dataset_info
    from fl_components.parameters import get_parameters
    from fl_components.site.models import build_model
    from fl_components.site.policy import installed_task_code
    from fl_components.wire.site_job import ModelRef, SiteJobMessage

    config = deployed_config(stack)
    model = get_parameters(build_model(config.model, dataset_info(config), seed=0))
    uri, sha = write_global_model(model, _state(stack) / "exchange" / "attacker")
    values: dict[str, Any] = {
        "federation": config,
        "site": site,
        "run_id": "attacker-run",
        "round": 1,
        "stage": "train",
        "model": ModelRef(uri=uri, sha256=sha),
        "task_code": installed_task_code(),
    }
    values.update(changes)
    return SiteJobMessage.model_validate(values)


def _signed(message: Any, identity: Any, *, audience: str | None = None, now: Any = None) -> Any:
    from fl_components.wire.signing import sign

    return sign(
        message,
        identity=identity,
        audience=audience or message.site,
        lifetime=timedelta(minutes=10),
        now=now,
    )


def _run_on(
    stack: dict[str, Any], site: str, parameters: dict[str, Any], **job_variables: Any
) -> dict[str, Any]:
    """Create a flow run on ``site``'s participant deployment with ``parameters``; finished."""
    api = stack["prefect_api_url"]
    deployment = _api_get(f"{api}/deployments/name/federated-participant/{site}").json()
    body: dict[str, Any] = {"parameters": parameters}
    if job_variables:
        body["job_variables"] = job_variables
    created = _api_post(f"{api}/deployments/{deployment['id']}/create_flow_run", json=body)
    assert created.status_code < 300, created.text
    return _wait_flow_run(api, created.json()["id"], timeout=300)


def _answer(stack: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """The stored result of ``run`` as the coordinator opens it (sealed, or a bare refusal)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from fl_components.secure_aggregation.site_stages import load_registry
    from fl_components.wire.sealed import AnswerContext, open_payload
    from tasks.work_pool import read_json_result

    with temporary_settings(updates={PREFECT_API_URL: stack["prefect_api_url"]}):
        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(run["id"])
        payload = read_json_result(flow_run)
    message = job_message(run)
    expected = AnswerContext(
        federation=message["federation"]["name"],
        run_id=message["run_id"],
        round=message["round"],
        stage=message["stage"],
        site=message["site"],
    )
    registry = load_registry(_state(stack) / "registry.json")
    return open_payload(payload, expected=expected, identity=_identity(stack), registry=registry)


def _last_refusal(stack: dict[str, Any], site: str) -> dict[str, Any]:
    from fl_components.site.audit import AuditKind, AuditLog

    entries = list(AuditLog.in_folder(_folder(stack, site)).entries())  # chain verified
    refused = [e for e in entries if e.kind is AuditKind.REFUSED]
    assert refused, f"no refusal in {site}'s audit log"
    return refused[-1].details


def _assert_refused(stack: dict[str, Any], site: str, run: dict[str, Any], reason: str) -> str:
    assert run["state"]["type"] == "COMPLETED", run["state"]
    answer = _answer(stack, run)
    assert answer["stage"] == "refusal" and answer["kind"] == "rejected", answer
    assert answer["reason"].startswith(f"{reason}:"), answer["reason"]
    audit = _last_refusal(stack, site)
    assert audit["reason"] == reason and audit["nonce"] == run["parameters"]["job"]["nonce"]
    return str(answer["reason"])


def _parameters(signed: Any) -> dict[str, Any]:
    from tasks.work_pool import signed_parameters

    return signed_parameters(signed)


def test_a_job_signed_by_another_key_is_refused(stack: dict[str, Any]) -> None:
    from fl_components.wire.signing import CoordinatorIdentity

    attacker = CoordinatorIdentity.generate()
    run = _run_on(stack, "north", _parameters(_signed(_message(stack, "north"), attacker)))
    _assert_refused(stack, "north", run, "unknown_key")


def test_a_tampered_job_is_refused(stack: dict[str, Any]) -> None:
    parameters = _parameters(_signed(_message(stack, "north"), _identity(stack)))
    parameters["job"]["message"]["stage"] = "evaluate"  # any field changed after signing
    run = _run_on(stack, "north", parameters)
    _assert_refused(stack, "north", run, "bad_signature")


def test_a_genuine_run_then_its_jobs_replayed_and_sent_to_another_site(
    stack: dict[str, Any],
) -> None:
    """A legitimate deployed run; its participant runs' parameters are readable from the API:
    replayed at the same site, or sent to another site, they are refused; the answers in
    result storage are ciphertext another site's key does not open."""
    summary = run_coordinator(stack, deployed_config(stack, rounds=1))
    assert summary is not None
    api = stack["prefect_api_url"]
    runs = participant_runs(api, _flow_run_id_of(summary))
    north = next(r for r in runs if job_message(r)["site"] == "north")
    # result storage holds ciphertext
    stored = _stored_result(stack, north)
    assert set(stored) == {"sealed"}
    assert set(stored["sealed"]) == {
        "context", "recipient_key_id", "ephemeral", "nonce", "ciphertext", "signature"
    }  # fmt: skip
    # replayed at north
    replay = _run_on(stack, "north", north["parameters"])
    _assert_refused(stack, "north", replay, "replayed")
    # north's job at south
    moved = _run_on(stack, "south", north["parameters"])
    _assert_refused(stack, "south", moved, "wrong_site")


def _flow_run_id_of(summary: Any) -> str:
    run_id = summary.prefect_flow_run_id
    assert run_id, summary
    return str(run_id)


def _stored_result(stack: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.work_pool import read_json_result

    with (
        temporary_settings(updates={PREFECT_API_URL: stack["prefect_api_url"]}),
        get_client(sync_client=True) as client,
    ):
        return read_json_result(client.read_flow_run(run["id"]))


def test_an_expired_job_is_refused(stack: dict[str, Any]) -> None:
    old = _signed(
        _message(stack, "north"), _identity(stack), now=datetime.now(UTC) - timedelta(hours=1)
    )
    run = _run_on(stack, "north", _parameters(old))
    _assert_refused(stack, "north", run, "expired")


def test_a_model_outside_the_exchange_is_never_opened(stack: dict[str, Any]) -> None:
    from fl_components.wire.site_job import ModelRef

    train = _folder(stack, "north") / "train.npz"  # the site's own data, as a "model"
    message = _message(stack, "north", model=ModelRef(uri=str(train), sha256="0" * 64))
    run = _run_on(stack, "north", _parameters(_signed(message, _identity(stack))))
    reason = _assert_refused(stack, "north", run, "model_location")
    assert "exchange folder" in reason


@pytest.fixture
def strict_policy(stack: dict[str, Any]) -> Any:
    """North's steward raises its floor: record-level DP (sigma >= 1), secure aggregation
    with at least 3 sites and a threshold of 2; restored afterwards."""
    from fl_components.site.policy import load_policy, policy_path

    path = policy_path(_folder(stack, "north"))
    original = path.read_text()
    policy = load_policy(path)
    strict = policy.model_copy(
        update={
            "privacy": policy.privacy.model_copy(
                update={"record_dp_required": True, "min_noise_multiplier": 1.0}
            ),
            "secure_aggregation": policy.secure_aggregation.model_copy(
                update={"required": True, "min_cohort": 3, "min_threshold": 2}
            ),
        }
    )
    strict.save(path)
    yield strict
    path.write_text(original)


def _secure_message(stack: dict[str, Any], *, participants: tuple[str, ...], threshold: int) -> Any:
    from fl_components.secure_aggregation.protocol import RoundContext
    from fl_components.secure_aggregation.site_stages import context_to_json
    from fl_components.wire.site_job import SecureStageRef

    config = deployed_config(
        stack,
        privacy={"mode": "record", "noise_multiplier": 1.2},
        secure_aggregation={"enabled": True},
    )
    context = RoundContext(
        run_id="attacker-run",
        round=1,
        participants=participants,
        threshold=threshold,
        dimension=12,
        clip_range=1.0,
    )
    return _message(
        stack,
        "north",
        federation=config,
        stage="mask",
        secagg=SecureStageRef(context=context_to_json(context)),
    )


@pytest.mark.parametrize(
    ("privacy", "secagg", "stage", "line"),
    [
        ({"mode": "off"}, {"enabled": True}, "mask", "privacy.record_dp_required"),
        (
            {"mode": "record", "noise_multiplier": 0.3, "max_epsilon": None},
            {"enabled": True},
            "mask",
            "privacy.min_noise_multiplier",
        ),
        (
            {"mode": "record", "noise_multiplier": 1.2},
            {"enabled": False},
            "train",
            "secure_aggregation.required",
        ),
        (
            {"mode": "record", "noise_multiplier": 1.2},
            {"enabled": True},
            "train",
            "secure_aggregation.required",
        ),
    ],
)
def test_a_coordinator_signed_job_below_the_sites_policy_is_refused(
    stack: dict[str, Any], strict_policy: Any, privacy: Any, secagg: Any, stage: str, line: str
) -> None:
    base = _secure_message(stack, participants=SITES, threshold=2)
    config = deployed_config(stack, privacy=privacy, secure_aggregation=secagg)
    changes: dict[str, Any] = {"federation": config, "stage": stage}
    if stage == "train":
        changes["secagg"] = None
    message = base.model_copy(update=changes)
    run = _run_on(stack, "north", _parameters(_signed(message, _identity(stack))))
    reason = _assert_refused(stack, "north", run, "policy")
    assert f"policy {line}" in reason, reason


@pytest.mark.parametrize(
    ("participants", "threshold", "line"),
    [
        (("north", "south"), 2, "secure_aggregation.min_cohort"),
        (SITES, 1, "secure_aggregation.min_threshold"),
    ],
)
def test_a_secure_round_below_the_cohort_or_threshold_floor_is_refused(
    stack: dict[str, Any], strict_policy: Any, participants: Any, threshold: int, line: str
) -> None:
    message = _secure_message(stack, participants=participants, threshold=threshold)
    run = _run_on(stack, "north", _parameters(_signed(message, _identity(stack))))
    reason = _assert_refused(stack, "north", run, "policy")
    assert f"policy {line}" in reason, reason


def test_job_variables_cannot_point_a_site_at_another_sites_data(stack: dict[str, Any]) -> None:
    """A genuine job for north, with job variables setting its worker's data folder to
    south's: the site's worker drops them, the job runs on north's own folder."""
    from fl_components.site.audit import AuditKind, AuditLog

    south_log = AuditLog.in_folder(_folder(stack, "south"))
    before = len(list(south_log.entries()))
    message = _message(stack, "north", stage="evaluate")
    run = _run_on(
        stack,
        "north",
        _parameters(_signed(message, _identity(stack))),
        env={"FEDPIPE_SITE_DIR": str(_folder(stack, "south")), "FEDPIPE_SITE_NAME": "south"},
        working_dir=str(_folder(stack, "south")),
    )
    assert run["state"]["type"] == "COMPLETED", run["state"]
    answer = _answer(stack, run)
    assert answer["stage"] == "evaluate" and answer["site"] == "north", answer
    assert len(list(south_log.entries())) == before  # nothing reached south's folder
    north = list(AuditLog.in_folder(_folder(stack, "north")).entries())
    assert north[-1].kind is AuditKind.RELEASED


def test_a_deployment_of_other_code_on_a_sites_pool_runs_nothing(
    stack: dict[str, Any], tmp_path: Path
) -> None:
    """Anyone with API access creates a deployment on north's pool with a command and an
    entrypoint of their own; the site's worker starts only the participant entry point,
    which refuses a run of any other flow: the marker the code would write never appears."""
    api = stack["prefect_api_url"]
    marker = tmp_path / "pwned"
    script = tmp_path / "evil.py"
    script.write_text(
        "from prefect import flow\n"
        f"@flow\ndef evil():\n    open({str(marker)!r}, 'w').write('ran')\n"
    )
    flow_id = _api_post(f"{api}/flows/", json={"name": "evil"}).json()["id"]
    created = _api_post(
        f"{api}/deployments/",
        json={
            "name": "evil",
            "flow_id": flow_id,
            "work_pool_name": "fedpipe-north",
            "entrypoint": f"{script}:evil",
            "path": str(tmp_path),
            "job_variables": {
                "command": f"python -c \"open({str(marker)!r}, 'w').write('ran')\"",
                "env": {"FEDPIPE_SITE_DIR": str(_folder(stack, "south"))},
            },
        },
    )
    assert created.status_code < 300, created.text
    run = _api_post(f"{api}/deployments/{created.json()['id']}/create_flow_run", json={}).json()
    done = _wait_flow_run(api, run["id"], timeout=300)
    assert done["state"]["type"] in ("FAILED", "CRASHED"), done["state"]
    time.sleep(1)
    assert not marker.exists()
    if done["state"]["type"] == "FAILED":
        assert "runs only the 'federated-participant' flow" in (done["state"]["message"] or "")


def test_the_site_audit_command_prints_and_verifies_the_chain(stack: dict[str, Any]) -> None:
    from tests.deploy.stack_harness import _fedpipe

    result = _fedpipe("site", "audit", "--folder", str(_folder(stack, "north")), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "chain verified" in result.stdout
    policy = _fedpipe(
        "site", "policy", "check", "--folder", str(_folder(stack, "north")), timeout=120
    )
    assert policy.returncode == 0, policy.stdout + policy.stderr


# ~265k parameters: an update (1.06 MB) above the sites' 1 MiB threshold for sealed files
LARGE_MODEL = {"kind": "mlp", "hidden": [1024, 192]}


def _released_files(stack: dict[str, Any], run_id: str, stage: str) -> dict[str, list[int]]:
    """Per site, the sizes of the sealed files its audit log says it released in ``run_id``."""
    from fl_components.site.audit import AuditKind, AuditLog

    found: dict[str, list[int]] = {}
    for site in SITES:
        for entry in AuditLog.in_folder(_folder(stack, site)).entries():
            details = entry.details
            ours = details.get("run_id") == run_id and details.get("stage") == stage
            if entry.kind is AuditKind.RELEASED and ours:
                found.setdefault(site, []).extend(f["bytes"] for f in details["files"])
    return found


def _assert_large_answers_crossed_as_files(
    stack: dict[str, Any], config: Any, summary: Any, stage: str, per_site: int
) -> None:
    run_id = _flow_run_id_of(summary)
    runs = participant_runs(stack["prefect_api_url"], run_id)
    assert {(s, stage) for s in SITES} <= {
        (job_message(r)["site"], job_message(r)["stage"]) for r in runs
    }
    assert all(r["state_type"] == "COMPLETED" for r in runs)
    for run in runs:  # result storage holds the sealed JSON only, not the update
        stored = _stored_result(stack, run)
        assert "sealed" in stored and len(json.dumps(stored)) < 64 * 1024
    released = _released_files(stack, run_id, stage)
    assert sorted(released) == sorted(SITES), released
    assert all(len(sizes) == per_site and min(sizes) > 1024 * 1024 for sizes in released.values())
    # every file was opened by the coordinator, then removed
    answers = Path(config.deployment.exchange_dir) / run_id / "answers"
    assert sorted(p.name for p in answers.iterdir()) == sorted(SITES)  # one folder a site
    left = [f for folder in answers.iterdir() for f in folder.iterdir()]
    assert left == [], left


def test_a_deployed_secure_round_of_a_large_model_sends_sealed_files(
    stack: dict[str, Any],
) -> None:
    """Each masked update (1.3 MB) leaves its site as a sealed file, not as result text."""
    config = deployed_config(
        stack, rounds=1, model=LARGE_MODEL, secure_aggregation={"enabled": True}
    )
    summary = run_coordinator(stack, config)
    assert summary is not None
    _assert_large_answers_crossed_as_files(stack, config, summary, "mask", per_site=1)


def test_a_large_scaffold_update_and_control_variate_cross_as_sealed_files(
    stack: dict[str, Any],
) -> None:
    """In the clear, a SCAFFOLD site's delta and control delta go as two sealed files."""
    config = deployed_config(
        stack,
        rounds=1,
        model=LARGE_MODEL,
        strategy={"name": "scaffold"},
        secure_aggregation={"enabled": False},
    )
    summary = run_coordinator(stack, config)
    assert summary is not None and summary.final_accuracy is not None
    _assert_large_answers_crossed_as_files(stack, config, summary, "train", per_site=2)
