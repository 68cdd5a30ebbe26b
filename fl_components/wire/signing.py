"""The coordinator's identity and signed messages: what a site checks before it reads its data.

The coordinator holds an Ed25519 key (RFC 8032) for signing jobs and an X25519 key for
receiving sealed answers, stored in the same format as a site's long-term keys
(:class:`~fl_components.secure_aggregation.protocol.keys.SiteKeys`: raw 32-byte files,
0600, never overwritten) in a key folder of its own, never in a config. Its *key id* is
the SHA-256 of the raw Ed25519 public key; a site pins the public half
(:class:`CoordinatorPublicKey`) when it is enrolled and trusts no other key.

Every message the coordinator sends a site is a pydantic model, signed inside a
:class:`Signed` envelope that adds the site it is for (``audience``), an expiry, a random
nonce and the key id. The signature covers canonical bytes: a domain label, the message's
wire type, and sorted-key compact JSON of ``model_dump(mode="json")`` together with the
envelope's fields, each length-prefixed, so that no two distinct envelopes or message types
share the bytes that were signed. The site re-dumps the message it parsed and verifies over
those bytes: what it acts on is exactly what was signed.

:func:`verify` raises :class:`~fl_components.wire.rejection.RejectedJob` with the first check
that fails, in this order: unknown key, bad signature, wrong site, expired (or valid for
longer than the site allows), replayed (the nonce register, :mod:`fl_components.site.nonces`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fl_components.errors import ConfigError
from fl_components.secure_aggregation.protocol.agreement import encode_fields
from fl_components.secure_aggregation.protocol.errors import KeyFileError
from fl_components.secure_aggregation.protocol.keys import ED25519_FILE, PublicKeys, SiteKeys
from fl_components.wire.rejection import RejectedJob, RejectReason

SIGNED_DOMAIN = b"fedpipe/signed-message/v1"
KEY_ID_HEX = 64
NONCE_BYTES = 16
# A job valid for longer than this is refused: its nonce would have to be remembered that
# long, and a captured job replayed after a site's nonce store was lost would still run.
MAX_LIFETIME = timedelta(hours=24)
# clocks of coordinator and site may differ by this much
CLOCK_SKEW = timedelta(minutes=5)

MessageT = TypeVar("MessageT", bound=BaseModel)
COORDINATOR_KEYS_ENV = "FEDPIPE_COORDINATOR_KEYS"
COORDINATOR_KEYS_DIR = "coordinator-keys"


def key_id_of(ed25519_public: bytes) -> str:
    """The key id of an Ed25519 public key: SHA-256 of its 32 raw bytes, hex."""
    return hashlib.sha256(ed25519_public).hexdigest()


def canonical_json(value: Any) -> bytes:
    """Sorted-key, compact, UTF-8 JSON; NaN and infinities are refused (not JSON)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def digest_of(message: BaseModel) -> str:
    """SHA-256 (hex) of a model's canonical JSON: the hash a config or job is known by."""
    return hashlib.sha256(canonical_json(message.model_dump(mode="json"))).hexdigest()


def wire_type(cls: type[BaseModel]) -> str:
    """A message class's wire type: its ``WIRE_TYPE`` (``"site-job/v1"``), else its name.

    The type is part of the signed bytes, so a signature made for one kind of message never
    verifies as another kind with the same fields.
    """
    declared = getattr(cls, "WIRE_TYPE", None)
    return declared if isinstance(declared, str) and declared else cls.__name__


def _utc_text(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def signed_bytes(
    message: BaseModel, *, audience: str, expires_at: datetime, nonce: str, key_id: str
) -> bytes:
    """The bytes a :class:`Signed` envelope's signature covers (domain-separated, canonical)."""
    return SIGNED_DOMAIN + encode_fields(
        wire_type(type(message)),
        audience,
        _utc_text(expires_at),
        nonce,
        key_id,
        canonical_json(message.model_dump(mode="json")),
    )


class CoordinatorPublicKey(BaseModel):
    """The coordinator's public keys as a site pins them; ``key_id`` must match ``ed25519``.

    Attributes
    ----------
    key_id : str
        SHA-256 (hex) of the raw Ed25519 public key.
    ed25519 : str
        Base64 of the raw Ed25519 public key (verifies jobs).
    x25519 : str
        Base64 of the raw X25519 public key (answers are sealed to it).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_id: str = Field(pattern=rf"^[0-9a-f]{{{KEY_ID_HEX}}}$")
    ed25519: str
    x25519: str

    @field_validator("ed25519", "x25519")
    @classmethod
    def _raw_32(cls, value: str) -> str:
        try:
            raw = base64.b64decode(value, validate=True)
        except ValueError:
            raise ValueError("must be base64 of a raw 32-byte public key") from None
        if len(raw) != 32:
            raise ValueError(f"must be base64 of 32 raw bytes (got {len(raw)})")
        return value

    @model_validator(mode="after")
    def _key_id_matches(self) -> CoordinatorPublicKey:
        """Refuse a key id that does not belong to the Ed25519 key next to it."""
        actual = key_id_of(base64.b64decode(self.ed25519))
        if actual != self.key_id:
            raise ValueError(
                f"key_id {self.key_id[:16]}... is not the SHA-256 of the ed25519 key "
                f"({actual[:16]}...); the pinned key was altered, re-pin it"
            )
        return self

    @property
    def raw_keys(self) -> PublicKeys:
        """The raw public keys, in the registry's type."""
        return PublicKeys(
            x25519=base64.b64decode(self.x25519), ed25519=base64.b64decode(self.ed25519)
        )

    @classmethod
    def of(cls, keys: PublicKeys) -> CoordinatorPublicKey:
        """The pinnable form of raw public keys."""
        encoded = keys.to_dict()
        return cls(key_id=key_id_of(keys.ed25519), **encoded)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the pin as JSON (public keys only), atomically."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        partial.write_text(self.model_dump_json(indent=2) + "\n")
        partial.replace(target)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CoordinatorPublicKey:
        """Read a pin written by :meth:`save`.

        Raises
        ------
        RejectedJob
            ``not_enrolled`` if the file is missing or not a valid pin: a site without a
            pinned coordinator runs nothing.
        """
        target = Path(path)
        if not target.is_file():
            raise RejectedJob(
                RejectReason.NOT_ENROLLED,
                f"no coordinator key is pinned at {target}; enrol the site with "
                "`fedpipe site init` (it pins the federation's coordinator key)",
            )
        try:
            return cls.model_validate_json(target.read_bytes())
        except ValidationError as error:
            first = error.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "(file)"
            raise RejectedJob(
                RejectReason.NOT_ENROLLED,
                f"{target}: {field}: {first['msg']}; re-pin the coordinator key with "
                "`fedpipe site init`",
            ) from None


@dataclass(frozen=True)
class CoordinatorIdentity:
    """The coordinator's private keys: Ed25519 signs jobs, X25519 opens sealed answers.

    Stored exactly as a site's keys are (:class:`SiteKeys`), in a folder of their own.
    """

    keys: SiteKeys

    @classmethod
    def generate(cls) -> CoordinatorIdentity:
        """Fresh keys from the operating system's CSPRNG."""
        return cls(SiteKeys.generate())

    @classmethod
    def create(cls, directory: str | os.PathLike[str]) -> CoordinatorIdentity:
        """Make keys and write them to ``directory`` (0600; an existing key is never replaced)."""
        identity = cls.generate()
        identity.keys.save(directory)
        return identity

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> CoordinatorIdentity:
        """Read keys written by :meth:`create`.

        Raises
        ------
        ConfigError
            If a key file is missing, malformed or readable by group or others.
        """
        try:
            return cls(SiteKeys.load(directory))
        except KeyFileError as error:
            message = str(error).replace("`fedpipe site init` for this site", "`fedpipe up`")
            raise ConfigError(f"coordinator key: {message}") from None

    @classmethod
    def load_or_create(cls, directory: str | os.PathLike[str]) -> CoordinatorIdentity:
        """The identity in ``directory``, made there first if it has none."""
        if not (Path(directory) / ED25519_FILE).is_file():
            return cls.create(directory)
        return cls.load(directory)

    @property
    def public(self) -> CoordinatorPublicKey:
        """The public half, as sites pin it."""
        return CoordinatorPublicKey.of(self.keys.public())

    @property
    def key_id(self) -> str:
        """SHA-256 (hex) of the raw Ed25519 public key."""
        return key_id_of(self.keys.public().ed25519)


def coordinator_keys_dir(exchange_dir: str | os.PathLike[str]) -> Path:
    """Where the coordinator's private keys live (``FEDPIPE_COORDINATOR_KEYS``, or a default).

    The default is ``coordinator-keys`` beside the exchange folder (``state/coordinator-keys``
    on the stack). Never inside a config: the config names the exchange folder, the keys
    sit beside it on the coordinator's host only.
    """
    configured = os.environ.get(COORDINATOR_KEYS_ENV)
    if configured:
        return Path(configured)
    return Path(exchange_dir).resolve().parent / COORDINATOR_KEYS_DIR


class Signed(BaseModel, Generic[MessageT]):
    """A message signed by the coordinator for one site, valid until ``expires_at``.

    Attributes
    ----------
    message : MessageT
        The typed message (a site job, an unmask request, a key rotation).
    audience : str
        The site the message is for; any other site refuses it.
    expires_at : datetime
        UTC; the site refuses the message afterwards.
    nonce : str
        128 random bits, hex; the site refuses a nonce it has seen.
    key_id : str
        The signing key's id (SHA-256 of its raw Ed25519 public key).
    signature : str
        Base64 Ed25519 signature over :func:`signed_bytes`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    message: MessageT
    audience: str = Field(min_length=1, max_length=63)
    expires_at: datetime
    nonce: str = Field(pattern=rf"^[0-9a-f]{{{2 * NONCE_BYTES}}}$")
    key_id: str = Field(pattern=rf"^[0-9a-f]{{{KEY_ID_HEX}}}$")
    signature: str = Field(min_length=1, max_length=128)

    @field_validator("expires_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("expires_at must carry a time zone (UTC)")
        return value.astimezone(UTC)


def sign(
    message: MessageT,
    *,
    identity: CoordinatorIdentity,
    audience: str,
    lifetime: timedelta,
    now: datetime | None = None,
) -> Signed[MessageT]:
    """Sign ``message`` for site ``audience``, valid for ``lifetime`` from ``now``.

    Raises
    ------
    ValueError
        If ``lifetime`` is not positive or longer than :data:`MAX_LIFETIME`.
    """
    if not timedelta(0) < lifetime <= MAX_LIFETIME:
        raise ValueError(f"lifetime must be in (0, {MAX_LIFETIME}] (got {lifetime})")
    issued = (now or datetime.now(UTC)).astimezone(UTC)
    expires_at = issued + lifetime
    nonce = secrets.token_hex(NONCE_BYTES)
    key_id = identity.key_id
    payload = signed_bytes(
        message, audience=audience, expires_at=expires_at, nonce=nonce, key_id=key_id
    )
    signature = base64.b64encode(identity.keys.sign(payload)).decode("ascii")
    # the envelope parametrised by the message's own class, so it validates as that type
    envelope_type: type[Signed[MessageT]] = Signed[type(message)]  # type: ignore[assignment,misc]
    return envelope_type(
        message=message,
        audience=audience,
        expires_at=expires_at,
        nonce=nonce,
        key_id=key_id,
        signature=signature,
    )


class NonceRegister(Protocol):
    """Where a site remembers the nonces it accepted (``fl_components.site.nonces``)."""

    def admit(self, nonce: str, *, expires_at: datetime, now: datetime) -> None:
        """Record ``nonce`` until ``expires_at``; raise ``RejectedJob(REPLAYED)`` if seen."""


def _check_signature(envelope: Signed[MessageT], pinned: CoordinatorPublicKey) -> None:
    """Refuse an envelope not signed by the pinned coordinator key, over every signed field."""
    if envelope.key_id != pinned.key_id:
        raise RejectedJob(
            RejectReason.UNKNOWN_KEY,
            f"signed by key {envelope.key_id[:16]}..., but this site pinned the coordinator "
            f"key {pinned.key_id[:16]}...; if the coordinator rotated its key, apply the "
            "rotation at the site",
        )
    try:
        signature = base64.b64decode(envelope.signature, validate=True)
    except ValueError:
        raise RejectedJob(RejectReason.BAD_SIGNATURE, "the signature is not base64") from None
    payload = signed_bytes(
        envelope.message,
        audience=envelope.audience,
        expires_at=envelope.expires_at,
        nonce=envelope.nonce,
        key_id=envelope.key_id,
    )
    try:
        Ed25519PublicKey.from_public_bytes(pinned.raw_keys.ed25519).verify(signature, payload)
    except InvalidSignature:
        raise RejectedJob(
            RejectReason.BAD_SIGNATURE,
            f"the {wire_type(type(envelope.message))} message does not verify against the "
            "pinned coordinator key: it was altered or signed by another key",
        ) from None


def _check_audience_and_time(envelope: Signed[MessageT], site: str, moment: datetime) -> None:
    """Refuse an envelope meant for another site, expired, or valid for too long."""
    if envelope.audience != site:
        raise RejectedJob(
            RejectReason.WRONG_SITE,
            f"this is site {site!r}; the message was signed for site {envelope.audience!r}",
        )
    named = getattr(envelope.message, "site", site)
    if named != site:
        raise RejectedJob(
            RejectReason.WRONG_SITE, f"this is site {site!r}; the message names site {named!r}"
        )
    if envelope.expires_at <= moment - CLOCK_SKEW:
        raise RejectedJob(
            RejectReason.EXPIRED,
            f"expired at {_utc_text(envelope.expires_at)} (now {_utc_text(moment)}); the "
            "coordinator must send a fresh job",
        )
    if envelope.expires_at > moment + MAX_LIFETIME + CLOCK_SKEW:
        raise RejectedJob(
            RejectReason.EXPIRED,
            f"valid until {_utc_text(envelope.expires_at)}, more than {MAX_LIFETIME} from now "
            f"({_utc_text(moment)}); the site accepts jobs valid for at most that long",
        )


def verify(
    envelope: Signed[MessageT],
    *,
    pinned: CoordinatorPublicKey,
    site: str,
    nonces: NonceRegister,
    now: datetime | None = None,
) -> MessageT:
    """Check ``envelope`` at ``site`` and return its message; record its nonce.

    Parameters
    ----------
    envelope : Signed
        As received (parsed by pydantic, not yet trusted).
    pinned : CoordinatorPublicKey
        The coordinator key this site pinned at enrolment; no other key is accepted.
    site : str
        The site checking (the envelope's audience must be it).
    nonces : NonceRegister
        The site's nonce store; the nonce is recorded only once everything else verified.
    now : datetime, optional
        The current time (default: the clock).

    Raises
    ------
    RejectedJob
        ``unknown_key``, ``bad_signature``, ``wrong_site``, ``expired`` or ``replayed``.
    """
    _check_signature(envelope, pinned)
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    _check_audience_and_time(envelope, site, moment)
    nonces.admit(envelope.nonce, expires_at=envelope.expires_at + CLOCK_SKEW, now=moment)
    return envelope.message


class KeyRotation(BaseModel):
    """The coordinator's new public key, signed by the key a site has pinned.

    A site that verifies it (:func:`verify`, against its current pin) pins ``new_key``;
    nothing else can change a site's pin except a fresh enrolment by the site itself.
    """

    WIRE_TYPE: ClassVar[str] = "coordinator-key-rotation/v1"
    model_config = ConfigDict(extra="forbid", frozen=True)

    federation: str
    site: str
    new_key: CoordinatorPublicKey
