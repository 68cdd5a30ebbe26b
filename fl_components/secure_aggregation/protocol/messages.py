"""The protocol's messages and their wire format (no pickle).

Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS (arXiv:1611.04482), Figure 4, has four rounds; we run them as two stages
because each stage is a remote dispatch (Section 4's AdvertiseKeys round is replaced by
long-term keys in the registry, and ConsistencyCheck is not run: see the threat model).

Wire format of every message::

    b"FPSA" | version (1 byte) | header length (u32 BE) | header (canonical JSON, UTF-8)
           | array length (u64 BE) | array (raw little-endian uint32) | signature length (u16 BE)
           | signature (Ed25519, 64 bytes, or empty for unsigned requests)

A masked update in Z_2^m with m < 32 (compression on) says ``field_bits: m`` in its header
and its array holds the values packed m bits each
(:mod:`fl_components.secure_aggregation.protocol.packing`);
with m = 32 the header has no such key, byte for byte the uncompressed format.

A masked update's signature is Ed25519 over SHA-256 of every byte before the signature
length (a response's, over those bytes directly). Parsing checks every
field's type and raises
:class:`~fl_components.secure_aggregation.protocol.errors.MalformedMessageError` otherwise.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from fl_components.secure_aggregation.protocol.errors import MalformedMessageError
from fl_components.secure_aggregation.protocol.packing import pack, packed_size, unpack

MAGIC = b"FPSA"
VERSION = 1
_WORD = np.dtype("<u4")
_FULL_FIELD = 32


class Stage(enum.StrEnum):
    """The message kinds, in protocol order."""

    MASKED_UPDATE = "masked_update"
    UNMASK_REQUEST = "unmask_request"
    UNMASK_RESPONSE = "unmask_response"


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _unb64(text: object, name: str) -> bytes:
    if not isinstance(text, str):
        raise MalformedMessageError(f"field {name!r} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise MalformedMessageError(f"field {name!r} is not valid base64") from exc


def _frame(header: Mapping[str, Any], array: bytes) -> bytes:
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return b"".join(
        (
            MAGIC,
            bytes([VERSION]),
            struct.pack(">I", len(text)),
            text,
            struct.pack(">Q", len(array)),
            array,
        )
    )


def _seal(payload: bytes, signature: bytes) -> bytes:
    return payload + struct.pack(">H", len(signature)) + signature


def _unframe(data: bytes, stage: Stage) -> tuple[dict[str, Any], memoryview, bytes, bytes]:
    """Split bytes into (header, array view, signature, payload digest); checks framing."""
    view = memoryview(data)
    try:
        if bytes(view[:4]) != MAGIC or view[4] != VERSION:
            raise MalformedMessageError(
                f"not a fedpipe secure-aggregation v{VERSION} message (bad magic or version)"
            )
        (header_len,) = struct.unpack(">I", view[5:9])
        header_end = 9 + header_len
        header = json.loads(bytes(view[9:header_end]))
        (array_len,) = struct.unpack(">Q", view[header_end : header_end + 8])
        array_end = header_end + 8 + array_len
        array = view[header_end + 8 : array_end]
        (sig_len,) = struct.unpack(">H", view[array_end : array_end + 2])
        signature = bytes(view[array_end + 2 : array_end + 2 + sig_len])
    except (struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
        raise MalformedMessageError(f"truncated or corrupt {stage} message: {exc}") from exc
    if len(array) != array_len or len(signature) != sig_len or array_end + 2 + sig_len != len(data):
        raise MalformedMessageError(f"{stage} message length does not match its framing")
    got = header.get("stage") if isinstance(header, dict) else None
    if got != stage.value:
        raise MalformedMessageError(f"expected a {stage} message, got stage {got!r}")
    return header, array, signature, hashlib.sha256(view[:array_end]).digest()


def _get(header: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = header.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MalformedMessageError(f"field {name!r} is missing or not of type {kind}")
    return value


def _str_map(header: Mapping[str, Any], name: str) -> dict[str, Any]:
    value: dict[str, Any] = _get(header, name, dict)
    if not all(isinstance(k, str) for k in value):
        raise MalformedMessageError(f"field {name!r} must map site names to values")
    return value


def _sites(header: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = _get(header, name, list)
    if not all(isinstance(v, str) for v in value):
        raise MalformedMessageError(f"field {name!r} must be a list of site names")
    return tuple(value)


class _SignedMessage:
    """What a site signs: its canonical payload and the signature, sealed together."""

    signature: bytes

    def signed_payload(self) -> bytes:
        raise NotImplementedError

    def with_signature(self, signature: bytes) -> Self:
        """Return a copy carrying ``signature``."""
        return replace(self, signature=signature)  # type: ignore[type-var]

    def to_bytes(self) -> bytes:
        """Serialize (the signed payload, then the signature)."""
        return _seal(self.signed_payload(), self.signature)


@dataclass(frozen=True, eq=False)
class MaskedUpdate(_SignedMessage):
    """Stage 1, participant -> coordinator: the masked vector and the encrypted shares.

    Attributes
    ----------
    run_id, round, sender : str, int, str
        Binding of the message.
    num_examples : int
        The sender's example count, in the clear (FedAvg weighting; not secret here).
    masked : numpy.ndarray of uint32, shape (d,)
        y_u = x_u + PRG(b_u) + sum_v +-PRG(s_{u,v}) mod 2^32.
    shares : Mapping[str, bytes]
        receiver -> AES-GCM blob of the receiver's Shamir share of b_u.
    self_mask_commitment : bytes
        SHA-256 commitment to b_u (checked after reconstruction).
    pairwise_commitments : Mapping[str, bytes]
        neighbour -> SHA-256 commitment to s_{u,v} (checked when a dropout is recovered).
    mask_seconds : float
        Time the sender spent quantizing and masking (reported to tracking).
    signature : bytes
        Ed25519 signature of the sender over :meth:`signed_payload`.
    field_bits : int
        m: every value of ``masked`` is below 2^m and travels in m bits (32: unpacked).
    """

    run_id: str
    round: int
    sender: str
    num_examples: int
    masked: npt.NDArray[np.uint32]
    shares: Mapping[str, bytes]
    self_mask_commitment: bytes
    pairwise_commitments: Mapping[str, bytes]
    mask_seconds: float = 0.0
    signature: bytes = field(default=b"", repr=False)
    field_bits: int = _FULL_FIELD
    # Set only by from_bytes, never copied by replace(): an edited copy is re-hashed.
    _wire_digest: bytes | None = field(default=None, init=False, repr=False, compare=False)

    stage = Stage.MASKED_UPDATE

    def _header(self) -> dict[str, Any]:
        return {
            "stage": self.stage.value,
            "run_id": self.run_id,
            "round": self.round,
            "sender": self.sender,
            "num_examples": self.num_examples,
            "dimension": int(self.masked.shape[0]),
            "shares": {k: _b64(v) for k, v in self.shares.items()},
            "self_mask_commitment": _b64(self.self_mask_commitment),
            "pairwise_commitments": {k: _b64(v) for k, v in self.pairwise_commitments.items()},
            "mask_seconds": self.mask_seconds,
        } | ({} if self.field_bits == _FULL_FIELD else {"field_bits": self.field_bits})

    def signed_payload(self) -> bytes:
        """The canonical bytes the signature covers."""
        if self.field_bits == _FULL_FIELD:
            array = np.ascontiguousarray(self.masked, dtype=_WORD).tobytes()
        else:
            array = pack(self.masked, self.field_bits)
        return _frame(self._header(), array)

    def signed_digest(self) -> bytes:
        """SHA-256 of :meth:`signed_payload`: what Ed25519 signs.

        Signing the digest rather than 4 MB of payload costs one SHA-256 pass (about
        1.5 GB/s here) instead of Ed25519's SHA-512 passes (two to sign, one to verify).
        For a parsed message it is the digest of the bytes actually received.
        """
        if self._wire_digest is not None:
            return self._wire_digest
        return hashlib.sha256(self.signed_payload()).digest()

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """Parse bytes written by :meth:`to_bytes` (the signature is not checked here)."""
        header, array, signature, digest = _unframe(data, Stage.MASKED_UPDATE)
        dimension = _get(header, "dimension", int)
        field_bits = header.get("field_bits", _FULL_FIELD)
        if not isinstance(field_bits, int) or not 2 <= field_bits <= _FULL_FIELD:
            raise MalformedMessageError(f"field 'field_bits' must be in [2, 32] (got {field_bits})")
        if dimension < 0 or len(array) != packed_size(dimension, field_bits):
            raise MalformedMessageError(
                f"masked vector holds {len(array)} bytes, header says {dimension} values of "
                f"{field_bits} bits"
            )
        mask_seconds = _get(header, "mask_seconds", (int, float))
        message = cls(
            run_id=_get(header, "run_id", str),
            round=_get(header, "round", int),
            sender=_get(header, "sender", str),
            num_examples=_get(header, "num_examples", int),
            # Unpacked: a read-only view of the received bytes, no copy of the vector.
            masked=np.frombuffer(array, dtype=_WORD)
            if field_bits == _FULL_FIELD
            else unpack(array, count=dimension, bits=field_bits),
            shares={k: _unb64(v, "shares") for k, v in _str_map(header, "shares").items()},
            self_mask_commitment=_unb64(header.get("self_mask_commitment"), "self_mask_commitment"),
            pairwise_commitments={
                k: _unb64(v, "pairwise_commitments")
                for k, v in _str_map(header, "pairwise_commitments").items()
            },
            mask_seconds=float(mask_seconds),
            signature=signature,
            field_bits=field_bits,
        )
        object.__setattr__(message, "_wire_digest", digest)
        return message


@dataclass(frozen=True, eq=False)
class UnmaskRequest:
    """Stage 2, coordinator -> one survivor: who survived, who dropped, its shares.

    Attributes
    ----------
    run_id, round, receiver : str, int, str
        Binding of the request.
    survivors : tuple[str, ...]
        Sites whose masked update was received (sorted).
    dropped : tuple[str, ...]
        Selected sites whose masked update never arrived (sorted).
    ciphertexts : Mapping[str, bytes]
        sender -> the AES-GCM blob the sender addressed to ``receiver``.
    """

    run_id: str
    round: int
    receiver: str
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    ciphertexts: Mapping[str, bytes]

    stage = Stage.UNMASK_REQUEST

    def to_bytes(self) -> bytes:
        """Serialize (unsigned: the coordinator holds no signing key)."""
        header = {
            "stage": self.stage.value,
            "run_id": self.run_id,
            "round": self.round,
            "receiver": self.receiver,
            "survivors": list(self.survivors),
            "dropped": list(self.dropped),
            "ciphertexts": {k: _b64(v) for k, v in self.ciphertexts.items()},
        }
        return _seal(_frame(header, b""), b"")

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """Parse bytes written by :meth:`to_bytes`."""
        header, _, _, _ = _unframe(data, Stage.UNMASK_REQUEST)
        return cls(
            run_id=_get(header, "run_id", str),
            round=_get(header, "round", int),
            receiver=_get(header, "receiver", str),
            survivors=_sites(header, "survivors"),
            dropped=_sites(header, "dropped"),
            ciphertexts={
                k: _unb64(v, "ciphertexts") for k, v in _str_map(header, "ciphertexts").items()
            },
        )


@dataclass(frozen=True, eq=False)
class UnmaskResponse(_SignedMessage):
    """Stage 2, survivor -> coordinator: b-shares of survivors, pairwise seeds of dropouts.

    Attributes
    ----------
    run_id, round, sender : str, int, str
        Binding of the response.
    self_mask_shares : Mapping[str, int]
        owner -> y of the sender's Shamir share of b_owner (x is the sender's index).
    pairwise_seeds : Mapping[str, bytes]
        dropped neighbour -> s_{sender,dropped} for this round.
    signature : bytes
        Ed25519 signature of the sender over :meth:`signed_payload`.
    """

    run_id: str
    round: int
    sender: str
    self_mask_shares: Mapping[str, int]
    pairwise_seeds: Mapping[str, bytes]
    signature: bytes = field(default=b"", repr=False)

    stage = Stage.UNMASK_RESPONSE

    def signed_payload(self) -> bytes:
        """The canonical bytes the signature covers."""
        header = {
            "stage": self.stage.value,
            "run_id": self.run_id,
            "round": self.round,
            "sender": self.sender,
            "self_mask_shares": {k: format(v, "x") for k, v in self.self_mask_shares.items()},
            "pairwise_seeds": {k: _b64(v) for k, v in self.pairwise_seeds.items()},
        }
        return _frame(header, b"")

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """Parse bytes written by :meth:`to_bytes` (the signature is not checked here)."""
        header, _, signature, _ = _unframe(data, Stage.UNMASK_RESPONSE)
        shares: dict[str, int] = {}
        for owner, text in _str_map(header, "self_mask_shares").items():
            try:
                shares[owner] = int(text, 16)
            except (TypeError, ValueError) as exc:
                raise MalformedMessageError(f"share of {owner!r} is not a hex integer") from exc
        return cls(
            run_id=_get(header, "run_id", str),
            round=_get(header, "round", int),
            sender=_get(header, "sender", str),
            self_mask_shares=shares,
            pairwise_seeds={
                k: _unb64(v, "pairwise_seeds")
                for k, v in _str_map(header, "pairwise_seeds").items()
            },
            signature=signature,
        )
