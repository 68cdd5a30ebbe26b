"""Pairwise key agreement: mask seeds, share-encryption keys, associated data, commitments.

Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS (arXiv:1611.04482), Section 4: the pairwise mask seed is
s_{u,v} = KA.agree(s_u^SK, s_v^PK) and shares travel under c_{u,v} = KA.agree(c_u^SK, c_v^PK)
with authenticated encryption. Both keys here come from one long-term X25519 agreement,
separated by HKDF-SHA256 (Krawczyk 2010, RFC 5869) with distinct ``info`` labels that bind
the run id, the round and the (sorted) pair, so every seed and key is per round and per run:
revealing one round's s_{u,v} says nothing about another round's.
"""

from __future__ import annotations

import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fl_components.secure_aggregation.protocol.errors import ShareDecryptionError

SEED_BYTES = 32
NONCE_BYTES = 12
PAIRWISE_LABEL = b"fedpipe/secagg/pairwise-seed/v1"
SHARE_KEY_LABEL = b"fedpipe/secagg/share-key/v1"
SHARE_AD_LABEL = b"fedpipe/secagg/share-ad/v1"
COMMIT_LABEL = b"fedpipe/secagg/commitment/v1"


def encode_fields(*fields: str | int | bytes) -> bytes:
    """Length-prefix each field so that distinct tuples never encode to the same bytes."""
    out = bytearray()
    for value in fields:
        if isinstance(value, int):
            raw = value.to_bytes(8, "big", signed=True)
        elif isinstance(value, str):
            raw = value.encode()
        else:
            raw = bytes(value)
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def _hkdf(shared: bytes, label: bytes, *, run_id: str, round: int, u: str, v: str) -> bytes:
    low, high = sorted((u, v))
    info = label + encode_fields(run_id, round, low, high)
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(shared)


def pairwise_seed(shared: bytes, *, run_id: str, round: int, u: str, v: str) -> bytes:
    """Return the 32-byte seed of the pairwise mask between ``u`` and ``v`` for this round."""
    return _hkdf(shared, PAIRWISE_LABEL, run_id=run_id, round=round, u=u, v=v)


def share_key(shared: bytes, *, run_id: str, round: int, u: str, v: str) -> bytes:
    """Return the AES-256-GCM key that carries shares between ``u`` and ``v`` this round."""
    return _hkdf(shared, SHARE_KEY_LABEL, run_id=run_id, round=round, u=u, v=v)


def mask_sign(site: str, peer: str) -> int:
    """+1 if ``site`` adds the pairwise mask with ``peer`` (site < peer), else -1."""
    return 1 if site < peer else -1


def share_associated_data(*, run_id: str, round: int, sender: str, receiver: str) -> bytes:
    """AES-GCM associated data: a share only opens in its own run, round and direction."""
    return SHARE_AD_LABEL + encode_fields(run_id, round, sender, receiver)


def encrypt_share(key: bytes, plaintext: bytes, *, associated_data: bytes) -> bytes:
    """Encrypt with AES-256-GCM under a fresh random nonce; returns ``nonce || ciphertext``."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def decrypt_share(key: bytes, blob: bytes, *, associated_data: bytes, sender: str) -> bytes:
    """Open a blob made by :func:`encrypt_share`.

    Raises
    ------
    ShareDecryptionError
        If authentication fails: the blob was altered, replayed from another run or round,
        or routed to the wrong receiver.
    """
    if len(blob) < NONCE_BYTES + 16:
        raise ShareDecryptionError(
            f"encrypted share from {sender!r} is {len(blob)} bytes, shorter than nonce + tag"
        )
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated_data)
    except InvalidTag:
        raise ShareDecryptionError(
            f"encrypted share from {sender!r} failed AES-GCM authentication: it was altered, "
            "replayed from another run or round, or sent to the wrong site; it is discarded"
        ) from None


def commitment(secret: bytes, *, run_id: str, round: int, owner: str, peer: str = "") -> bytes:
    """SHA-256 commitment to a 256-bit random seed, bound to its run, round and owner.

    Hiding because the seed is uniformly random and 256 bits long; binding by collision
    resistance. It lets the coordinator check a reconstructed seed before using it, so a bad
    share or seed aborts the round instead of corrupting the sum.
    """
    return hashlib.sha256(
        COMMIT_LABEL + encode_fields(run_id, round, owner, peer) + secret
    ).digest()
