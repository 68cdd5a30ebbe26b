"""The site's gate, played by an attacker with API access: no job reaches the data unverified.

Each test builds an enrolled site folder (pinned coordinator key, policy, exchange folder,
keys) and sends the gate a job the way the participant flow receives it (JSON), then checks
the refusal's reason and the audit log's record of it.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl_components.config import FederationConfig
from fl_components.exchange import write_global_model
from fl_components.secure_aggregation.protocol import RoundContext
from fl_components.secure_aggregation.protocol.keys import Registry, SiteKeys
from fl_components.secure_aggregation.site_stages import context_to_json
from fl_components.site.admission import SignedSiteJob, admit, seal_answer
from fl_components.site.audit import AuditKind, AuditLog
from fl_components.site.enrolment import apply_rotation, enrol, load_enrolment
from fl_components.site.policy import (
    TaskPin,
    installed_task_code,
    load_policy,
    policy_from_federation,
    policy_path,
)
from fl_components.task.loading import task_identity
from fl_components.wire.rejection import PolicyBreach, RejectedAnswer, RejectedJob, RejectReason
from fl_components.wire.sealed import AnswerContext, SealedAnswer, open_answer
from fl_components.wire.signing import CoordinatorIdentity, KeyRotation, Signed, sign
from fl_components.wire.site_job import ModelRef, SecureStageRef, SiteJobMessage, TaskRef

SITES = ("north", "south", "east")


@pytest.fixture
def config(tmp_path: Path) -> FederationConfig:
    return FederationConfig.model_validate(
        {
            "name": "fed",
            "rounds": 3,
            "sites": [{"name": s} for s in SITES],
            "participation": {"min_participants": 3},
            "backend": "work-pool",
            "privacy": {"mode": "record", "noise_multiplier": 1.0, "max_epsilon": 5.0},
            "secure_aggregation": {"enabled": True, "threshold": 3},
            "deployment": {"exchange_dir": str(tmp_path / "exchange")},
        }
    )


class Federation:
    """A coordinator and three enrolled site folders on this machine."""

    def __init__(self, root: Path, config: FederationConfig) -> None:
        self.root = root
        self.config = config
        self.coordinator = CoordinatorIdentity.create(root / "coordinator-keys")
        self.exchange = root / "exchange"
        self.exchange.mkdir()
        self.keys = {site: SiteKeys.generate() for site in SITES}
        self.registry_file = root / "registry.json"
        self.registry = Registry({s: k.public() for s, k in self.keys.items()})
        self.registry_file.write_text(self.registry.to_json())
        self.folders: dict[str, Path] = {}
        for site in SITES:
            folder = root / "sites" / site
            folder.mkdir(parents=True)
            self.keys[site].save(folder / "keys")
            enrol(
                folder,
                federation=config.name,
                site=site,
                coordinator=self.coordinator.public,
                exchange_dir=self.exchange,
                registry=self.registry_file,
            )
            policy_from_federation(config, coordinator_key_id=self.coordinator.key_id).save(
                policy_path(folder)
            )
            self.folders[site] = folder
        uri, sha = write_global_model([np.ones((4, 3), dtype=np.float32)], self.exchange / "run")
        self.model = ModelRef(uri=uri, sha256=sha)

    def message(self, site: str = "north", **changes: Any) -> SiteJobMessage:
        context = RoundContext(
            run_id="run-1",
            round=1,
            participants=SITES,
            threshold=3,
            dimension=12,
            clip_range=1.0,
        )
        values: dict[str, Any] = {
            "federation": self.config,
            "site": site,
            "run_id": "run-1",
            "round": 1,
            "stage": "mask",
            "model": self.model,
            "secagg": SecureStageRef(context=context_to_json(context)),
            "task_code": installed_task_code(),
        }
        values.update(changes)
        return SiteJobMessage.model_validate(values)

    def signed(
        self,
        message: SiteJobMessage,
        *,
        audience: str | None = None,
        identity: CoordinatorIdentity | None = None,
        now: datetime | None = None,
    ) -> SignedSiteJob:
        envelope = sign(
            message,
            identity=identity or self.coordinator,
            audience=audience or message.site,
            lifetime=timedelta(minutes=10),
            now=now,
        )
        # as the participant flow receives it: the job's JSON, parsed again
        return SignedSiteJob.model_validate_json(envelope.model_dump_json())


@pytest.fixture
def fed(tmp_path: Path, config: FederationConfig) -> Federation:
    return Federation(tmp_path, config)


def _refused(fed: Federation, envelope: SignedSiteJob, site: str = "north") -> RejectedJob:
    with pytest.raises(RejectedJob) as caught:
        admit(envelope, folder=fed.folders[site])
    last = list(AuditLog.in_folder(fed.folders[site]).entries())[-1]
    assert last.kind is AuditKind.REFUSED
    assert last.details["reason"] == str(caught.value.reason)
    return caught.value


def test_a_genuine_job_is_admitted_with_the_sites_own_settings(fed: Federation) -> None:
    job = fed.message(
        federation=fed.config.model_copy(
            update={"privacy": fed.config.privacy.model_copy(update={"max_epsilon": None})}
        )
    )
    admitted = admit(fed.signed(job), folder=fed.folders["north"])
    # the job's lifted budget is replaced by the policy's; the registry is the enrolment's
    assert admitted.message.federation.privacy.max_epsilon == 5.0
    assert admitted.message.federation.secure_aggregation.registry == str(
        fed.registry_file.resolve()
    )
    kinds = [e.kind for e in AuditLog.in_folder(fed.folders["north"]).entries()]
    assert kinds[-2:] == [AuditKind.RECEIVED, AuditKind.ACCEPTED]


def test_a_forged_job_is_refused(fed: Federation) -> None:
    attacker = CoordinatorIdentity.generate()
    refusal = _refused(fed, fed.signed(fed.message(), identity=attacker))
    assert refusal.reason is RejectReason.UNKNOWN_KEY
    raw = json.loads(fed.signed(fed.message()).model_dump_json())
    raw["message"]["federation"]["privacy"]["mode"] = "off"
    raw["message"]["federation"]["privacy"]["noise_multiplier"] = None
    refusal = _refused(fed, SignedSiteJob.model_validate(raw))
    assert refusal.reason is RejectReason.BAD_SIGNATURE


def test_another_sites_job_is_refused_even_when_run_on_this_sites_folder(fed: Federation) -> None:
    # a genuine job for south, run by north's worker (e.g. its folder swapped in by env)
    refusal = _refused(fed, fed.signed(fed.message(site="south")), site="north")
    assert refusal.reason is RejectReason.WRONG_SITE


def test_a_replayed_job_is_refused(fed: Federation) -> None:
    envelope = fed.signed(fed.message())
    admit(envelope, folder=fed.folders["north"])
    assert _refused(fed, envelope).reason is RejectReason.REPLAYED


def test_an_expired_job_is_refused(fed: Federation) -> None:
    old = fed.signed(fed.message(), now=datetime.now(UTC) - timedelta(hours=1))
    assert _refused(fed, old).reason is RejectReason.EXPIRED


def _with(config: FederationConfig, **sections: dict[str, Any]) -> FederationConfig:
    raw = config.model_dump(mode="json", exclude_unset=True)
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return FederationConfig.model_validate(raw)


@pytest.mark.parametrize(
    ("sections", "line"),
    [
        (
            {"privacy": {"mode": "off", "noise_multiplier": None, "max_epsilon": None}},
            "privacy.record_dp_required",
        ),
        ({"privacy": {"noise_multiplier": 0.3}}, "privacy.min_noise_multiplier"),
        (
            {"secure_aggregation": {"enabled": False, "threshold": None}},
            "secure_aggregation.required",
        ),
    ],
)
def test_a_signed_job_asking_for_less_privacy_is_refused(fed: Federation, sections, line) -> None:
    config = _with(fed.config, **sections)
    stage = "train" if not config.secure_aggregation.enabled else "mask"
    message = fed.message(
        federation=config, stage=stage, secagg=None if stage == "train" else fed.message().secagg
    )
    refusal = _refused(fed, fed.signed(message))
    assert isinstance(refusal, PolicyBreach) and refusal.line.startswith(line)


@pytest.mark.parametrize(
    ("participants", "threshold", "line"),
    [
        (("north", "south"), 2, "secure_aggregation.min_cohort"),
        (SITES, 1, "secure_aggregation.min_threshold"),
    ],
)
def test_a_round_below_the_cohort_or_threshold_floor_is_refused(
    fed, participants, threshold, line
) -> None:
    context = RoundContext(
        run_id="run-1",
        round=1,
        participants=participants,
        threshold=threshold,
        dimension=12,
        clip_range=1.0,
    )
    message = fed.message(secagg=SecureStageRef(context=context_to_json(context)))
    refusal = _refused(fed, fed.signed(message))
    assert isinstance(refusal, PolicyBreach) and refusal.line.startswith(line)


def test_the_clear_train_stage_is_refused_when_secure_aggregation_is_required(fed) -> None:
    refusal = _refused(fed, fed.signed(fed.message(stage="train", secagg=None)))
    assert isinstance(refusal, PolicyBreach) and refusal.line.startswith(
        "secure_aggregation.required"
    )


def test_a_model_path_outside_the_exchange_is_refused(fed: Federation, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    uri, sha = write_global_model([np.ones((4, 3), dtype=np.float32)], elsewhere)
    for path in (uri, str(fed.exchange / ".." / "elsewhere" / Path(uri).name)):
        refusal = _refused(fed, fed.signed(fed.message(model=ModelRef(uri=path, sha256=sha))))
        assert refusal.reason is RejectReason.MODEL_LOCATION
    link = fed.exchange / "link.npz"
    os.symlink(uri, link)
    refusal = _refused(fed, fed.signed(fed.message(model=ModelRef(uri=str(link), sha256=sha))))
    assert refusal.reason is RejectReason.MODEL_LOCATION


def test_another_task_code_is_refused(fed: Federation) -> None:
    refusal = _refused(fed, fed.signed(fed.message(task_code="0" * 64)))
    assert isinstance(refusal, PolicyBreach) and refusal.line == "task_code.accepted"


def test_an_unenrolled_folder_runs_nothing(fed: Federation, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(RejectedJob) as caught:
        admit(fed.signed(fed.message()), folder=bare)
    assert caught.value.reason is RejectReason.NOT_ENROLLED


def test_the_answer_is_sealed_to_the_coordinator_and_signed_by_the_site(fed: Federation) -> None:
    admitted = admit(fed.signed(fed.message()), folder=fed.folders["north"])
    payload = {"stage": "mask", "site": "north", "masked": "c2VjcmV0"}
    stored = seal_answer(
        payload,
        enrolment=admitted.enrolment,
        message=admitted.message,
        keys_dir=fed.folders["north"] / "keys",
        folder=fed.folders["north"],
    )
    assert "c2VjcmV0" not in json.dumps(stored)
    sealed = SealedAnswer.model_validate(stored["sealed"])
    expected = AnswerContext(federation="fed", run_id="run-1", round=1, stage="mask", site="north")
    opened = open_answer(sealed, expected=expected, identity=fed.coordinator, registry=fed.registry)
    assert json.loads(opened) == payload
    with pytest.raises(RejectedAnswer):  # south's keys cannot open it
        open_answer(
            sealed,
            expected=expected,
            identity=CoordinatorIdentity(fed.keys["south"]),
            registry=fed.registry,
        )
    released = list(AuditLog.in_folder(fed.folders["north"]).entries())[-1]
    assert (
        released.kind is AuditKind.RELEASED
        and released.details["sealed_to"] == fed.coordinator.key_id
    )


def test_a_key_rotation_signed_by_the_pinned_key_repins(fed: Federation, tmp_path: Path) -> None:
    successor = CoordinatorIdentity.generate()
    rotation = KeyRotation(federation="fed", site="north", new_key=successor.public)
    envelope = sign(
        rotation, identity=fed.coordinator, audience="north", lifetime=timedelta(minutes=5)
    )
    apply_rotation(
        fed.folders["north"], Signed[KeyRotation].model_validate_json(envelope.model_dump_json())
    )
    assert load_enrolment(fed.folders["north"]).coordinator == successor.public
    assert load_policy(policy_path(fed.folders["north"])).coordinator_key_id == successor.key_id
    # the old key no longer runs jobs here; the new one does
    assert _refused(fed, fed.signed(fed.message())).reason is RejectReason.UNKNOWN_KEY
    admit(fed.signed(fed.message(), identity=successor), folder=fed.folders["north"])
    # a rotation signed by an attacker's key is refused
    attacker = CoordinatorIdentity.generate()
    rogue = sign(
        KeyRotation(federation="fed", site="south", new_key=attacker.public),
        identity=attacker,
        audience="south",
        lifetime=timedelta(minutes=5),
    )
    with pytest.raises(RejectedJob):
        apply_rotation(fed.folders["south"], rogue)
    assert load_enrolment(fed.folders["south"]).coordinator == fed.coordinator.public


@pytest.mark.parametrize(
    ("privacy", "floor", "line"),
    [
        # sigma 1.0 passes the noise floor, but one round spends more than the run may
        ({"noise_multiplier": 1.0}, {"max_epsilon_per_run": 0.01}, "privacy.max_epsilon_per_run"),
        # a target epsilon within the run's limit, whose derived sigma is below the floor
        (
            {"noise_multiplier": None, "target_epsilon": 40.0},
            {"max_epsilon_per_run": 50.0, "min_noise_multiplier": 1.0},
            "privacy.min_noise_multiplier",
        ),
    ],
)
def test_the_round_spend_is_checked_with_the_sites_own_sigma(
    tmp_path: Path, privacy: dict[str, Any], floor: dict[str, Any], line: str
) -> None:
    from fl_components.federation import Site, dataset_info, materialize_sites
    from fl_components.site.admission import check_spend
    from fl_components.site.policy import SitePolicy

    config = FederationConfig.model_validate(
        {
            "name": "fed",
            "rounds": 2,
            "sites": [{"name": s} for s in SITES],
            "data": {"dataset": "digits", "sites_dir": str(tmp_path / "sites")},
            "training": {"epochs": 1, "batch_size": 64},
            "privacy": {"mode": "record", "max_epsilon": 100.0, **privacy},
            "deployment": {"exchange_dir": str(tmp_path / "exchange")},
        }
    )
    (folder,) = [p for p in materialize_sites(config) if p.name == "north"]
    coordinator = CoordinatorIdentity.generate()
    enrol(
        folder,
        federation="fed",
        site="north",
        coordinator=coordinator.public,
        exchange_dir=tmp_path / "exchange",
        registry=tmp_path / "registry.json",
    )
    base = policy_from_federation(config, coordinator_key_id=coordinator.key_id)
    strict = base.model_copy(update={"privacy": base.privacy.model_copy(update=floor)})
    strict.save(policy_path(folder))
    assert isinstance(strict, SitePolicy)
    uri, sha = write_global_model([np.ones((4, 3), dtype=np.float32)], tmp_path / "exchange")
    message = SiteJobMessage(
        federation=config,
        site="north",
        run_id="run-1",
        mlflow_run_id="ml-1",
        round=1,
        stage="train",
        model=ModelRef(uri=uri, sha256=sha),
        task_code=installed_task_code(),
    )
    envelope = sign(message, identity=coordinator, audience="north", lifetime=timedelta(minutes=5))
    admitted = admit(SignedSiteJob.model_validate_json(envelope.model_dump_json()), folder=folder)
    site = Site(
        name="north", folder=folder, config=admitted.message.federation, info=dataset_info(config)
    )
    with pytest.raises(PolicyBreach) as caught:
        check_spend(admitted, site=site)
    assert caught.value.line.startswith(line)
    last = list(AuditLog.in_folder(folder).entries())[-1]
    assert last.kind is AuditKind.REFUSED and last.details["reason"] == "policy"


def _builtin_task_ref(fed: Federation, **changes: Any) -> TaskRef:
    identity = task_identity(fed.config).as_dict()
    return TaskRef.model_validate({**identity, **changes})


def test_a_job_expecting_other_task_code_than_installed_is_refused(fed: Federation) -> None:
    forged = _builtin_task_ref(fed, sha256="0" * 64)  # the coordinator ran other code
    refusal = _refused(fed, fed.signed(fed.message(task=forged)))
    assert isinstance(refusal, PolicyBreach) and refusal.line == "task"
    assert "fedpipe site check" in str(refusal)


def test_a_task_the_policy_does_not_pin_is_refused(fed: Federation) -> None:
    folder = fed.folders["north"]
    policy = load_policy(policy_path(folder))
    pinned = policy.model_copy(update={"task": TaskPin(sha256=("1" * 64,))})
    pinned.save(policy_path(folder))
    refusal = _refused(fed, fed.signed(fed.message(task=_builtin_task_ref(fed))))
    assert isinstance(refusal, PolicyBreach) and refusal.line.startswith("task.sha256")


def test_a_task_spec_other_than_the_pinned_one_is_refused(fed: Federation) -> None:
    folder = fed.folders["north"]
    policy = load_policy(policy_path(folder))
    policy.model_copy(update={"task": TaskPin(spec="my_clinic.fl:task")}).save(policy_path(folder))
    refusal = _refused(fed, fed.signed(fed.message(task=_builtin_task_ref(fed))))
    assert isinstance(refusal, PolicyBreach) and refusal.line.startswith("task.spec")


def test_the_admitted_job_names_its_task_code_in_the_audit_log(fed: Federation) -> None:
    ref = _builtin_task_ref(fed)
    folder = fed.folders["north"]
    policy = load_policy(policy_path(folder))
    policy.model_copy(update={"task": TaskPin(sha256=(ref.sha256,))}).save(policy_path(folder))
    admit(fed.signed(fed.message(task=ref)), folder=folder)
    last = list(AuditLog.in_folder(folder).entries())[-1]
    assert last.kind is AuditKind.ACCEPTED
    assert last.details["task"]["sha256"] == ref.sha256
    assert last.details["task"]["spec"] == "builtin:mlp"
