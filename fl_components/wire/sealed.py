"""Answers only the coordinator can read, signed by the site that sent them.

A site's answer (its update, masked update, unmask response or evaluation) leaves the site
sealed to the coordinator's X25519 key, an ECIES-style construction from standard parts:
a fresh ephemeral X25519 key per answer (RFC 7748), HKDF-SHA256 (RFC 5869) over the
shared secret, and AES-256-GCM (NIST SP 800-38D). The HKDF info and the GCM associated
data bind the answer's :class:`AnswerContext` (federation, coordinator run, round, stage,
site) and both public keys, so a sealed answer opens only for that coordinator key and in
that context: moved to another run, round, stage or site, it fails authentication.

The site then signs the sealed bytes with its long-term Ed25519 key (the one enrolled in
the federation's registry, :mod:`fl_components.secure_aggregation.protocol.keys`); the
coordinator verifies that signature against the registry before it decrypts anything
(:func:`open_answer`).
Result storage, and every other site reading it, sees only ciphertext.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fl_components.exchange import parse_json_payload
from fl_components.secure_aggregation.protocol.agreement import encode_fields
from fl_components.secure_aggregation.protocol.keys import PublicKeys, Registry, SiteKeys
from fl_components.wire.rejection import AnswerReason, RejectedAnswer
from fl_components.wire.signing import CoordinatorIdentity, CoordinatorPublicKey

KEY_LABEL = b"fedpipe/sealed-answer/key/v1"
AD_LABEL = b"fedpipe/sealed-answer/associated-data/v1"
SIGNATURE_LABEL = b"fedpipe/sealed-answer/signature/v1"
NONCE_BYTES = 12
TAG_BYTES = 16


class AnswerContext(BaseModel):
    """Where an answer belongs: it opens only here.

    Attributes
    ----------
    federation : str
        The federation's name.
    run_id : str
        The coordinator's run (its Prefect flow run id).
    round : int
        The round.
    stage : str
        ``train``, ``mask``, ``unmask`` or ``evaluate``.
    site : str
        The site answering.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    federation: str = Field(min_length=1)
    run_id: str = Field(min_length=1)
    round: int = Field(ge=0)
    stage: str = Field(min_length=1)
    site: str = Field(min_length=1)

    def encoded(self) -> bytes:
        """The context, length-prefixed field by field."""
        return encode_fields(self.federation, self.run_id, self.round, self.stage, self.site)


class SealedAnswer(BaseModel):
    """A site's answer as it crosses result storage: ciphertext, signed by the site.

    Attributes
    ----------
    context : AnswerContext
        Where it belongs (bound into the key, the associated data and the signature).
    recipient_key_id : str
        The coordinator key it is sealed to.
    ephemeral : str
        Base64 of the ephemeral X25519 public key.
    nonce : str
        Base64 of the 12-byte AES-GCM nonce.
    ciphertext : str
        Base64 of the AES-256-GCM ciphertext and tag.
    signature : str
        Base64 Ed25519 signature of the site over :meth:`signed_bytes`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    context: AnswerContext
    recipient_key_id: str = Field(pattern=r"^[0-9a-f]{64}$")
    ephemeral: str
    nonce: str
    ciphertext: str
    signature: str

    def signed_bytes(self) -> bytes:
        """What the site's signature covers: context, recipient, and every sealed byte."""
        return SIGNATURE_LABEL + encode_fields(
            self.context.encoded(),
            self.recipient_key_id,
            _unb64(self.ephemeral, "ephemeral"),
            _unb64(self.nonce, "nonce"),
            _unb64(self.ciphertext, "ciphertext"),
        )

    @property
    def size(self) -> int:
        """Bytes of ciphertext (what left the site, for its audit log)."""
        return len(_unb64(self.ciphertext, "ciphertext"))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str, field: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise RejectedAnswer(
            AnswerReason.MALFORMED, f"sealed answer: {field} is not base64"
        ) from None


def _key(shared: bytes, *, context: AnswerContext, ephemeral: bytes, recipient: bytes) -> bytes:
    info = KEY_LABEL + encode_fields(context.encoded(), ephemeral, recipient)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def _associated_data(context: AnswerContext, recipient_key_id: str) -> bytes:
    return AD_LABEL + encode_fields(context.encoded(), recipient_key_id)


def seal(
    plaintext: bytes,
    *,
    context: AnswerContext,
    recipient: CoordinatorPublicKey,
    sender: SiteKeys,
) -> SealedAnswer:
    """Encrypt ``plaintext`` to the coordinator's key and sign the result as the site.

    Parameters
    ----------
    plaintext : bytes
        The answer (JSON bytes).
    context : AnswerContext
        Where it belongs; ``context.site`` is the sender.
    recipient : CoordinatorPublicKey
        The coordinator key the site pinned at enrolment.
    sender : SiteKeys
        The site's long-term keys (its Ed25519 key signs).
    """
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    recipient_raw = recipient.raw_keys.x25519
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient_raw))
    key = _key(shared, context=context, ephemeral=ephemeral_public, recipient=recipient_raw)
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = AESGCM(key).encrypt(nonce, plaintext, _associated_data(context, recipient.key_id))
    unsigned = SealedAnswer(
        context=context,
        recipient_key_id=recipient.key_id,
        ephemeral=_b64(ephemeral_public),
        nonce=_b64(nonce),
        ciphertext=_b64(ciphertext),
        signature="",
    )
    signature = sender.sign(unsigned.signed_bytes())
    return unsigned.model_copy(update={"signature": _b64(signature)})


def check_sender(sealed: SealedAnswer, *, expected: AnswerContext, registry: Registry) -> None:
    """Check that ``sealed`` belongs to ``expected`` and is signed by that site's enrolled key.

    Raises
    ------
    RejectedAnswer
        ``wrong_context``, ``unknown_site`` or ``bad_signature``.
    """
    if sealed.context != expected:
        got, want = sealed.context.model_dump(), expected.model_dump()
        differs = ", ".join(
            f"{k} {got[k]!r} (expected {want[k]!r})" for k in want if got[k] != want[k]
        )
        raise RejectedAnswer(
            AnswerReason.WRONG_CONTEXT,
            f"an answer from site {sealed.context.site!r} belongs elsewhere: {differs}",
        )
    keys: PublicKeys | None = registry.get(expected.site)
    if keys is None:
        raise RejectedAnswer(
            AnswerReason.UNKNOWN_SITE,
            f"site {expected.site!r} is not in the federation registry; its answer is refused",
        )
    try:
        Ed25519PublicKey.from_public_bytes(keys.ed25519).verify(
            _unb64(sealed.signature, "signature"), sealed.signed_bytes()
        )
    except InvalidSignature:
        raise RejectedAnswer(
            AnswerReason.BAD_SIGNATURE,
            f"the answer for site {expected.site!r} is not signed by that site's enrolled key "
            "(altered, or sent by another party); it is discarded",
        ) from None


def open_answer(
    sealed: SealedAnswer,
    *,
    expected: AnswerContext,
    identity: CoordinatorIdentity,
    registry: Registry,
) -> bytes:
    """The plaintext of ``sealed``, once its sender and context are verified.

    Parameters
    ----------
    sealed : SealedAnswer
        As read from result storage.
    expected : AnswerContext
        The federation, run, round, stage and site the coordinator asked.
    identity : CoordinatorIdentity
        The coordinator's keys (its X25519 key opens the answer).
    registry : Registry
        The federation's enrolled site keys.

    Raises
    ------
    RejectedAnswer
        If the context differs, the site is not enrolled, the signature is not the site's,
        the answer was sealed to another key, or decryption fails.
    """
    check_sender(sealed, expected=expected, registry=registry)
    if sealed.recipient_key_id != identity.key_id:
        raise RejectedAnswer(
            AnswerReason.WRONG_RECIPIENT,
            f"site {expected.site!r} sealed its answer to key {sealed.recipient_key_id[:16]}..., "
            f"not this coordinator's {identity.key_id[:16]}... (a site still pinning a rotated "
            "key: apply the rotation at the site)",
        )
    ephemeral = _unb64(sealed.ephemeral, "ephemeral")
    nonce = _unb64(sealed.nonce, "nonce")
    ciphertext = _unb64(sealed.ciphertext, "ciphertext")
    if len(ephemeral) != 32 or len(nonce) != NONCE_BYTES or len(ciphertext) < TAG_BYTES:
        raise RejectedAnswer(
            AnswerReason.MALFORMED,
            f"sealed answer from {expected.site!r}: ephemeral key, nonce or ciphertext too short",
        )
    recipient = identity.keys.public().x25519
    try:
        shared = identity.keys.x25519.exchange(X25519PublicKey.from_public_bytes(ephemeral))
    except ValueError:  # a low-order point: the shared secret would be all zeros
        raise RejectedAnswer(
            AnswerReason.MALFORMED, f"sealed answer from {expected.site!r}: invalid ephemeral key"
        ) from None
    key = _key(shared, context=expected, ephemeral=ephemeral, recipient=recipient)
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, _associated_data(expected, identity.key_id))
    except InvalidTag:
        raise RejectedAnswer(
            AnswerReason.UNREADABLE,
            f"the answer of site {expected.site!r} failed AES-GCM authentication: altered, "
            "or sealed for another context or key",
        ) from None


SEALED_KEY = "sealed"


def sealed_payload(sealed: SealedAnswer) -> dict[str, Any]:
    """What a site returns to result storage: ``{"sealed": <SealedAnswer>}``."""
    return {SEALED_KEY: sealed.model_dump(mode="json")}


def open_payload(
    payload: Mapping[str, Any],
    *,
    expected: AnswerContext,
    identity: CoordinatorIdentity,
    registry: Registry,
) -> dict[str, Any]:
    """The JSON answer inside a site's stored payload, once verified and decrypted.

    An answer that is not sealed is refused, except a ``rejected`` refusal from a site that
    has no pinned coordinator key to seal to (it says only that the site refused).

    Raises
    ------
    RejectedAnswer
        If the payload is neither, or fails :func:`open_answer`.
    """
    if SEALED_KEY not in payload:
        if payload.get("stage") == "refusal" and payload.get("kind") == "rejected":
            return dict(payload)
        raise RejectedAnswer(
            AnswerReason.MALFORMED,
            f"site {expected.site!r} answered in the clear; only answers sealed to the "
            "coordinator and signed by the site are read",
        )
    try:
        sealed = SealedAnswer.model_validate(payload[SEALED_KEY])
    except ValidationError as error:
        raise RejectedAnswer(
            AnswerReason.MALFORMED, f"site {expected.site!r}: not a sealed answer ({error})"
        ) from None
    plaintext = open_answer(sealed, expected=expected, identity=identity, registry=registry)
    document = parse_json_payload(plaintext, what=f"site {expected.site!r} answer")
    if not isinstance(document, dict):
        raise RejectedAnswer(AnswerReason.MALFORMED, f"site {expected.site!r}: not a JSON object")
    return document
