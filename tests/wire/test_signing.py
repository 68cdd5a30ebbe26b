"""Signed messages, played by an attacker: every forgery, replay and misdirection is refused."""

from __future__ import annotations

import base64
import json
import math
import os
import pickle
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ClassVar

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from fl_components.config import FederationConfig
from fl_components.errors import ConfigError
from fl_components.site.nonces import NonceStore
from fl_components.wire.rejection import PolicyBreach, RejectedJob, RejectReason
from fl_components.wire.signing import (
    MAX_LIFETIME,
    CoordinatorIdentity,
    CoordinatorPublicKey,
    KeyRotation,
    Signed,
    canonical_json,
    digest_of,
    key_id_of,
    sign,
    signed_bytes,
    verify,
)

NOW = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)


class Job(BaseModel):
    WIRE_TYPE: ClassVar[str] = "test-job/v1"
    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str
    round: int
    stage: str
    model_sha256: str
    noise: float


class OtherJob(BaseModel):
    """Same fields, another wire type: a signature for one must not verify as the other."""

    WIRE_TYPE: ClassVar[str] = "other-job/v1"
    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str
    round: int
    stage: str
    model_sha256: str
    noise: float


def _job(site: str = "site-a", **changes: object) -> Job:
    values: dict[str, object] = {
        "site": site,
        "round": 3,
        "stage": "mask",
        "model_sha256": "ab" * 32,
        "noise": 1.1,
    }
    values.update(changes)
    return Job.model_validate(values)


@pytest.fixture
def coordinator() -> CoordinatorIdentity:
    return CoordinatorIdentity.generate()


@pytest.fixture
def nonces(tmp_path: Path) -> NonceStore:
    return NonceStore.in_folder(tmp_path / "site-a")


def _received(envelope: Signed[Job]) -> Signed[Job]:
    """What the site parses after the envelope crossed the wire as JSON."""
    return Signed[Job].model_validate_json(envelope.model_dump_json())


def _tampered(envelope: Signed[Job], edit) -> Signed[Job]:  # type: ignore[no-untyped-def]
    raw = json.loads(envelope.model_dump_json())
    edit(raw)
    return Signed[Job].model_validate(raw)


def _sign(identity: CoordinatorIdentity, job: Job, *, audience: str = "site-a") -> Signed[Job]:
    return sign(job, identity=identity, audience=audience, lifetime=timedelta(minutes=10), now=NOW)


def _reason(call) -> RejectReason:  # type: ignore[no-untyped-def]
    with pytest.raises(RejectedJob) as caught:
        call()
    return caught.value.reason


def test_a_signed_job_verifies_once_after_crossing_the_wire(coordinator, nonces) -> None:
    envelope = _received(_sign(coordinator, _job()))
    message = verify(envelope, pinned=coordinator.public, site="site-a", nonces=nonces, now=NOW)
    assert message == _job()
    assert len(nonces) == 1


def test_a_forged_signature_is_refused(coordinator, nonces) -> None:
    forged = _tampered(
        _sign(coordinator, _job()),
        lambda raw: raw.update(signature=base64.b64encode(os.urandom(64)).decode()),
    )
    reason = _reason(
        lambda: verify(forged, pinned=coordinator.public, site="site-a", nonces=nonces, now=NOW)
    )
    assert reason is RejectReason.BAD_SIGNATURE


def test_a_job_signed_by_another_key_is_refused_whatever_key_id_it_claims(
    coordinator, nonces
) -> None:
    attacker = CoordinatorIdentity.generate()
    own_id = _received(_sign(attacker, _job()))
    assert (
        _reason(
            lambda: verify(own_id, pinned=coordinator.public, site="site-a", nonces=nonces, now=NOW)
        )
        is RejectReason.UNKNOWN_KEY
    )
    # the attacker claims the pinned key id and signs the bytes that id implies
    job = _job()
    expires = NOW + timedelta(minutes=10)
    payload = signed_bytes(
        job, audience="site-a", expires_at=expires, nonce="00" * 16, key_id=coordinator.key_id
    )
    claimed = Signed[Job](
        message=job,
        audience="site-a",
        expires_at=expires,
        nonce="00" * 16,
        key_id=coordinator.key_id,
        signature=base64.b64encode(attacker.keys.sign(payload)).decode(),
    )
    assert (
        _reason(
            lambda: verify(
                claimed, pinned=coordinator.public, site="site-a", nonces=nonces, now=NOW
            )
        )
        is RejectReason.BAD_SIGNATURE
    )
    assert len(nonces) == 0  # nothing unverified reaches the nonce store


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("noise", 0.3),  # less privacy
        ("stage", "train"),  # the clear stage
        ("round", 4),
        ("model_sha256", "cd" * 32),  # another model
        ("site", "site-b"),
    ],
)
def test_any_tampered_field_breaks_the_signature(coordinator, nonces, field, value) -> None:
    envelope = _tampered(
        _sign(coordinator, _job()), lambda raw: raw["message"].update({field: value})
    )
    reason = _reason(
        lambda: verify(envelope, pinned=coordinator.public, site="site-a", nonces=nonces, now=NOW)
    )
    assert reason is RejectReason.BAD_SIGNATURE


@pytest.mark.parametrize(
    "edit",
    [
        lambda raw: raw.update(audience="site-b"),
        lambda raw: raw.update(expires_at="2027-01-01T00:00:00Z"),  # lifting the expiry
        lambda raw: raw.update(nonce="11" * 16),  # a fresh nonce for a replay
    ],
    ids=["audience", "expiry", "nonce"],
)
def test_the_envelope_fields_are_signed_too(coordinator, nonces, edit) -> None:
    envelope = _tampered(_sign(coordinator, _job()), edit)
    reason = _reason(
        lambda: verify(
            envelope,
            pinned=coordinator.public,
            site=envelope.audience,
            nonces=nonces,
            now=NOW,
        )
    )
    assert reason is RejectReason.BAD_SIGNATURE


def test_another_sites_job_is_refused(coordinator, nonces) -> None:
    for_b = _received(_sign(coordinator, _job(site="site-b"), audience="site-b"))
    reason = _reason(
        lambda: verify(for_b, pinned=coordinator.public, site="site-a", nonces=nonces, now=NOW)
    )
    assert reason is RejectReason.WRONG_SITE
    # signed for site-a but naming site-b inside (a coordinator bug): refused too
    mixed = _received(_sign(coordinator, _job(site="site-b"), audience="site-a"))
    reason = _reason(
        lambda: verify(mixed, pinned=coordinator.public, site="site-a", nonces=nonces, now=NOW)
    )
    assert reason is RejectReason.WRONG_SITE


def test_an_expired_job_is_refused(coordinator, nonces) -> None:
    envelope = _received(_sign(coordinator, _job()))
    later = NOW + timedelta(minutes=16)  # 10 min lifetime + 5 min skew allowance
    reason = _reason(
        lambda: verify(envelope, pinned=coordinator.public, site="site-a", nonces=nonces, now=later)
    )
    assert reason is RejectReason.EXPIRED


def test_a_job_valid_for_too_long_is_refused(coordinator, nonces) -> None:
    job = _job()
    expires = NOW + MAX_LIFETIME + timedelta(hours=1)
    payload = signed_bytes(
        job, audience="site-a", expires_at=expires, nonce="22" * 16, key_id=coordinator.key_id
    )
    envelope = Signed[Job](
        message=job,
        audience="site-a",
        expires_at=expires,
        nonce="22" * 16,
        key_id=coordinator.key_id,
        signature=base64.b64encode(coordinator.keys.sign(payload)).decode(),
    )
    reason = _reason(
        lambda: verify(envelope, pinned=coordinator.public, site="site-a", nonces=nonces, now=NOW)
    )
    assert reason is RejectReason.EXPIRED
    with pytest.raises(ValueError, match="lifetime"):
        sign(job, identity=coordinator, audience="site-a", lifetime=timedelta(days=2))


def test_a_replayed_job_is_refused_even_by_a_fresh_process(coordinator, tmp_path) -> None:
    envelope = _received(_sign(coordinator, _job()))
    folder = tmp_path / "site-a"
    verify(
        envelope,
        pinned=coordinator.public,
        site="site-a",
        nonces=NonceStore.in_folder(folder),
        now=NOW,
    )
    again = NonceStore.in_folder(folder)  # the next participant process reads the file
    reason = _reason(
        lambda: verify(
            envelope,
            pinned=coordinator.public,
            site="site-a",
            nonces=again,
            now=NOW + timedelta(minutes=1),
        )
    )
    assert reason is RejectReason.REPLAYED


def test_a_forgery_carrying_a_real_nonce_does_not_burn_it(coordinator, nonces) -> None:
    genuine = _received(_sign(coordinator, _job()))
    forged = _tampered(genuine, lambda raw: raw["message"].update(noise=0.1))
    with pytest.raises(RejectedJob):
        verify(forged, pinned=coordinator.public, site="site-a", nonces=nonces, now=NOW)
    assert verify(genuine, pinned=coordinator.public, site="site-a", nonces=nonces, now=NOW)


def test_expired_nonces_are_pruned(coordinator, nonces) -> None:
    for minute in range(3):
        envelope = _received(
            sign(
                _job(),
                identity=coordinator,
                audience="site-a",
                lifetime=timedelta(minutes=1),
                now=NOW + timedelta(minutes=minute),
            )
        )
        verify(
            envelope,
            pinned=coordinator.public,
            site="site-a",
            nonces=nonces,
            now=NOW + timedelta(minutes=minute),
        )
    assert len(nonces) == 3
    late = _received(_sign_at(coordinator, NOW + timedelta(hours=1)))
    verify(
        late, pinned=coordinator.public, site="site-a", nonces=nonces, now=NOW + timedelta(hours=1)
    )
    assert len(nonces) == 1


def _sign_at(identity: CoordinatorIdentity, moment: datetime) -> Signed[Job]:
    return sign(
        _job(), identity=identity, audience="site-a", lifetime=timedelta(minutes=5), now=moment
    )


def test_two_processes_racing_with_one_job_run_it_once(coordinator, tmp_path) -> None:
    from concurrent.futures import ProcessPoolExecutor

    envelope = _received(_sign(coordinator, _job()))
    folder = tmp_path / "site-a"
    with ProcessPoolExecutor(max_workers=4) as pool:
        outcomes = list(
            pool.map(
                _admit_in_process,
                [(envelope.model_dump_json(), str(folder), coordinator.public.model_dump_json())]
                * 8,
            )
        )
    assert sorted(outcomes) == ["accepted"] + ["replayed"] * 7


def _admit_in_process(args: tuple[str, str, str]) -> str:
    wire, folder, pin = args
    try:
        verify(
            Signed[Job].model_validate_json(wire),
            pinned=CoordinatorPublicKey.model_validate_json(pin),
            site="site-a",
            nonces=NonceStore.in_folder(folder),
            now=NOW,
        )
    except RejectedJob as error:
        return str(error.reason)
    return "accepted"


def test_a_signature_for_one_message_type_never_verifies_as_another(coordinator, nonces) -> None:
    envelope = _sign(coordinator, _job())
    confused = Signed[OtherJob].model_validate_json(envelope.model_dump_json())
    reason = _reason(
        lambda: verify(confused, pinned=coordinator.public, site="site-a", nonces=nonces, now=NOW)
    )
    assert reason is RejectReason.BAD_SIGNATURE


def test_a_federation_config_round_trips_through_signing(coordinator, nonces) -> None:
    class ConfigJob(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        site: str
        federation: FederationConfig

    config = FederationConfig.model_validate(
        {
            "name": "fed",
            "sites": [{"name": "site-a"}, {"name": "site-b"}, {"name": "site-c"}],
            "privacy": {"mode": "record", "noise_multiplier": 1.1, "max_epsilon": 3.0},
            "secure_aggregation": {"enabled": True, "threshold": 3},
        }
    )
    envelope = sign(
        ConfigJob(site="site-a", federation=config),
        identity=coordinator,
        audience="site-a",
        lifetime=timedelta(minutes=5),
        now=NOW,
    )
    received = Signed[ConfigJob].model_validate_json(envelope.model_dump_json())
    message = verify(received, pinned=coordinator.public, site="site-a", nonces=nonces, now=NOW)
    assert message.federation == config
    assert digest_of(message.federation) == digest_of(config)
    # lifting the budget inside the signed config breaks the signature
    raw = json.loads(envelope.model_dump_json())
    raw["message"]["federation"]["privacy"]["max_epsilon"] = None
    raw["nonce"] = envelope.nonce
    lifted = Signed[ConfigJob].model_validate(raw)
    reason = _reason(
        lambda: verify(lifted, pinned=coordinator.public, site="site-a", nonces=nonces, now=NOW)
    )
    assert reason is RejectReason.BAD_SIGNATURE


def test_canonical_json_is_order_free_and_refuses_nan() -> None:
    assert canonical_json({"b": 1, "a": [1.5, "é"]}) == canonical_json({"a": [1.5, "é"], "b": 1})
    assert canonical_json({"a": 1}) == b'{"a":1}'
    with pytest.raises(ValueError):
        canonical_json({"x": math.nan})


def test_identity_is_saved_0600_loaded_and_never_overwritten(tmp_path: Path) -> None:
    folder = tmp_path / "coordinator-keys"
    made = CoordinatorIdentity.create(folder)
    for name in ("ed25519.key", "x25519.key"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    assert CoordinatorIdentity.load(folder).key_id == made.key_id
    assert CoordinatorIdentity.load_or_create(folder).key_id == made.key_id
    with pytest.raises(Exception, match="refusing to overwrite"):
        CoordinatorIdentity.create(folder)
    (folder / "ed25519.key").chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        CoordinatorIdentity.load(folder)
    assert made.key_id == key_id_of(made.keys.public().ed25519)


def test_a_pin_whose_key_id_was_swapped_is_not_a_pin(tmp_path: Path, coordinator) -> None:
    path = coordinator.public.save(tmp_path / "coordinator.json")
    assert CoordinatorPublicKey.load(path) == coordinator.public
    attacker = CoordinatorIdentity.generate()
    raw = json.loads(path.read_text())
    raw["ed25519"] = attacker.public.ed25519  # key swapped, id kept
    path.write_text(json.dumps(raw))
    with pytest.raises(RejectedJob) as caught:
        CoordinatorPublicKey.load(path)
    assert caught.value.reason is RejectReason.NOT_ENROLLED
    with pytest.raises(RejectedJob, match="site init"):
        CoordinatorPublicKey.load(tmp_path / "missing.json")
    with pytest.raises(ValidationError):
        CoordinatorPublicKey(
            key_id="00" * 32, ed25519=attacker.public.ed25519, x25519=attacker.public.x25519
        )


def test_a_rotation_is_accepted_only_when_signed_by_the_pinned_key(coordinator, nonces) -> None:
    successor = CoordinatorIdentity.generate()
    rotation = KeyRotation(federation="fed", site="site-a", new_key=successor.public)
    envelope = sign(
        rotation, identity=coordinator, audience="site-a", lifetime=timedelta(minutes=5), now=NOW
    )
    received = Signed[KeyRotation].model_validate_json(envelope.model_dump_json())
    assert (
        verify(received, pinned=coordinator.public, site="site-a", nonces=nonces, now=NOW).new_key
        == successor.public
    )
    # the attacker's own key, "rotated in" by signing with it: unknown key
    attacker = CoordinatorIdentity.generate()
    rogue = sign(
        KeyRotation(federation="fed", site="site-a", new_key=attacker.public),
        identity=attacker,
        audience="site-a",
        lifetime=timedelta(minutes=5),
        now=NOW,
    )
    reason = _reason(
        lambda: verify(rogue, pinned=coordinator.public, site="site-a", nonces=nonces, now=NOW)
    )
    assert reason is RejectReason.UNKNOWN_KEY


def test_refusals_survive_pickling_with_their_reason() -> None:
    error = RejectedJob(RejectReason.EXPIRED, "late")
    again = pickle.loads(pickle.dumps(error))
    assert again.reason is RejectReason.EXPIRED and str(again) == str(error)
    breach = pickle.loads(pickle.dumps(PolicyBreach("privacy.delta", "too large")))
    assert breach.reason is RejectReason.POLICY and breach.line == "privacy.delta"
